"""The training device and its numeric precision.

``train.device=auto`` takes CUDA when torch sees a GPU, else the CPU — unless the cell runs under a GPU
launcher profile (``PROXYATTENTION_REQUIRE_GPU=1``, set by ``hydra/launcher=slurm_v100`` and by the local
launcher when it pins cells to GPUs), where a missing or unusable GPU is an error, never a silent CPU run.
A GPU the installed torch has no kernels for (a V100, sm_70, under a CUDA 13 build) is refused at trial
start with a one-line error naming the GPU, its capability, the build's architectures and the fix for
that GPU (for Volta: a build that still has sm_70 kernels, :func:`install_hint`).

Precision (:meth:`Precision.choose`) applies on CUDA only. ``train.amp`` gates mixed precision; with it
on, bf16 from capability 8.0 and fp16 with a gradient scaler below (bf16 has no tensor-core path on a
V100). ``model.amp=false`` means "never fp16" (ViT is unstable in it): such a model still takes bf16 from
8.0 (bf16 has fp32's exponent range) and fp32 below. A trial that computes in fp32 on CUDA lets
matmuls and convolutions use TF32 (a no-op before capability 8.0); TF32 is as repeatable as fp32 (the
same inputs give the same outputs), so ``train.deterministic`` keeps it.

``train.deterministic`` (:func:`configure_backends`): deterministic cuDNN algorithms without autotuning,
``torch.use_deterministic_algorithms(True, warn_only=True)`` and the cuBLAS workspace setting that
deterministic cuBLAS needs, so a proxy cell and its baseline stay identical up to the first proxy step
on a GPU too. Off (the default), cuDNN autotunes (``cudnn.benchmark``) on CUDA.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from launcher.cellstate import REQUIRE_GPU_ENV
from proxyattention.config import ConfigError

log = logging.getLogger(__name__)

# Builds with Volta (sm_70) kernels: PyTorch's cu126 builds keep sm_70 through torch 2.14 (its cu128
# builds dropped it from 2.11 on, the CUDA 13 ones never had it); on PyPI the newest torch with sm_70
# kernels is 2.10, whose default build is cu128. A wheel bundles its CUDA runtime: only the node's driver
# must be recent enough for that CUDA version.
VOLTA_INSTALL = ('a CUDA 12.6 build, `pip install "torch<=2.14.1" torchvision --index-url '
                 'https://download.pytorch.org/whl/cu126`, or torch 2.10 from PyPI, '
                 '`pip install "torch==2.10.*" "torchvision==0.25.*"`')
GPU_INSTALL_HINT = (f"install a PyTorch build whose architecture list includes the GPU's (for a V100, sm_70: "
                    f"{VOLTA_INSTALL}; see docs/cluster.md)")


def is_volta(capability: Sequence[int]) -> bool:
    """Compute capability 7.0 (V100, Titan V) or 7.2 (Jetson Xavier): the architectures recent builds dropped."""
    return capability[0] == 7 and capability[1] < 5


def install_hint(capability: Optional[Sequence[int]] = None) -> str:
    """What to install so torch runs a GPU of ``capability`` (unknown: the general hint, with the V100 recipe)."""
    if capability is None:
        return GPU_INSTALL_HINT
    if is_volta(capability):  # sm_70 cubins run on 7.2 as well
        return (f"install a PyTorch build with Volta (sm_70) kernels: {VOLTA_INSTALL}; "
                "see docs/cluster.md")
    arch = f"sm_{capability[0]}{capability[1]}"
    return (f"install a PyTorch build whose architecture list includes {arch} "
            "(`python -c \"import torch; print(torch.cuda.get_arch_list())\"` shows a build's list); "
            "see docs/cluster.md")


def gpu_required() -> bool:
    """True when the launcher asked for a GPU (``PROXYATTENTION_REQUIRE_GPU`` set and not 0/false)."""
    return os.environ.get(REQUIRE_GPU_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _version(arch: str) -> Optional[tuple[int, int]]:
    """``sm_70`` → (7, 0), ``sm_120`` → (12, 0), ``compute_90a`` → (9, 0); None if unreadable."""
    m = re.fullmatch(r"(?:sm|compute)_(\d+)[a-z]?", arch)
    if m is None:
        return None
    digits = m.group(1)
    return int(digits[:-1]), int(digits[-1])


def has_kernels(capability: tuple[int, int], arch_list: Sequence[str]) -> bool:
    """Whether a build for ``arch_list`` runs on a GPU of ``capability``.

    A cubin for sm_XY runs on X.Z with Z >= Y (same major version); PTX (compute_XY) is compiled at load
    time for any capability >= X.Y. An empty list (a build that does not say) is taken as fitting.
    """
    if not arch_list:
        return True
    for arch in arch_list:
        v = _version(arch)
        if v is None:
            continue
        if arch.startswith("sm_") and v[0] == capability[0] and v[1] <= capability[1]:
            return True
        if arch.startswith("compute_") and v <= tuple(capability):
            return True
    return False


def check_gpu(device: torch.device) -> None:
    """Refuse a GPU the installed torch cannot run (no kernels for its architecture), in one line."""
    cap = tuple(torch.cuda.get_device_capability(device))
    archs = torch.cuda.get_arch_list()
    if has_kernels(cap, archs):
        return
    raise ConfigError(
        f"GPU {torch.cuda.get_device_name(device)} (compute capability {cap[0]}.{cap[1]}, sm_{cap[0]}{cap[1]}) "
        f"has no kernels in this PyTorch {torch.__version__} (CUDA {torch.version.cuda}, built for "
        f"{' '.join(archs)}); {install_hint(cap)}")


def _nvidia_gpus_present() -> bool:
    return os.path.isdir("/proc/driver/nvidia/gpus") and bool(os.listdir("/proc/driver/nvidia/gpus"))


def resolve_device(name: str) -> torch.device:
    """``train.device`` (auto, cpu, cuda) as a torch device, checked against the installed build.

    cuda without a usable GPU is a config error; so is auto when the launcher requires a GPU.
    """
    required = gpu_required()
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda")
        check_gpu(device)
        return device
    why = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable CUDA device "
           f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r})")
    if name == "cuda":
        raise ConfigError(f"train.device=cuda but {why}; use train.device=auto or cpu, or {GPU_INSTALL_HINT}")
    if required:
        raise ConfigError(f"this cell runs under a GPU launcher profile ({REQUIRE_GPU_ENV}=1) but {why}; "
                          f"check the node's GPU and driver, or {GPU_INSTALL_HINT}")
    if _nvidia_gpus_present():
        log.warning("an NVIDIA GPU is installed but %s: training on the CPU; %s", why, GPU_INSTALL_HINT)
    return torch.device("cpu")


@dataclass
class Precision:
    """The trial's numeric precision: bf16 or fp16 autocast (fp16 with a gradient scaler), or fp32."""

    dtype: Optional[torch.dtype]
    scaler: Optional[torch.amp.GradScaler]

    @classmethod
    def choose(cls, amp: bool, model_amp: bool, device: torch.device) -> "Precision":
        """``train.amp`` and ``model.amp`` on ``device``.

        ``amp`` (``train.amp``) gates mixed precision: off, or on the CPU, fp32. ``model_amp``
        (``model.amp``) false means "not fp16" (ViT is unstable in it). bf16 where the GPU computes it
        natively (capability 8.0 and newer), whatever ``model_amp``; below 8.0, fp16 + gradient scaler,
        or fp32 for a model that must not run in fp16.
        """
        if not amp or device.type != "cuda":
            return cls(None, None)
        if tuple(torch.cuda.get_device_capability(device)) >= (8, 0):
            return cls(torch.bfloat16, None)
        if not model_amp:
            return cls(None, None)
        return cls(torch.float16, torch.amp.GradScaler("cuda"))

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")

    def autocast(self, device: torch.device) -> Any:
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None)


# cuBLAS is repeatable only with a fixed workspace per stream: this environment variable, read when the
# process first calls cuBLAS (PyTorch and cuBLAS both read it once), so it is set in the trial's set-up,
# before the model is built. ":4096:8" (eight 4 MiB buffers) is what PyTorch's reproducibility notes give.
CUBLAS_WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


def configure_backends(device: torch.device, deterministic: bool = False,
                       precision: Optional[Precision] = None) -> None:
    """Process-wide torch settings of a trial (``train.deterministic``, TF32), set both ways, so a trial's
    backends follow its config and not whatever ran before it in the process.

    ``deterministic`` false: cuDNN autotunes its convolution algorithms for the trial's fixed input
    shapes on CUDA (``cudnn.benchmark``); true: deterministic cuDNN algorithms, no autotuning,
    ``torch.use_deterministic_algorithms(True, warn_only=True)`` (an op without a deterministic version
    warns instead of failing) and ``CUBLAS_WORKSPACE_CONFIG`` (kept if already set). Call it before the
    first cuBLAS call of the process. TF32 matmuls and convolutions are allowed when the trial computes
    in fp32 on CUDA (``precision`` fp32), and matmuls are kept in full fp32 otherwise (torch's default).
    """
    cuda = device.type == "cuda"
    if deterministic:
        os.environ.setdefault(CUBLAS_WORKSPACE_ENV, CUBLAS_DETERMINISTIC_WORKSPACE)
    on, warns = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if on != deterministic or (deterministic and not warns):  # only when it changes: it imports inductor (seconds)
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = cuda and not deterministic
    fp32 = cuda and (precision is None or precision.dtype is None)
    torch.backends.cuda.matmul.allow_tf32 = fp32
    torch.backends.cudnn.allow_tf32 = True  # torch's default: TF32 convolutions (only fp32 ones are affected)


def uses_tf32(device: torch.device, precision: Precision) -> bool:
    """Whether the trial's fp32 matmuls and convolutions ran in TF32 (fp32 on CUDA from capability 8.0)."""
    return (device.type == "cuda" and precision.dtype is None and torch.backends.cuda.matmul.allow_tf32
            and tuple(torch.cuda.get_device_capability(device)) >= (8, 0))


def device_info(device: torch.device, precision: Precision, batch_size: int,
                deterministic: bool = False) -> dict[str, Any]:
    """The ``device`` block of ``result.json``: where and how the trial computed."""
    import platform

    cuda = device.type == "cuda"
    return {
        "type": device.type,
        "name": torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine()),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "precision": precision.name,
        "tf32": uses_tf32(device, precision),
        "batch_size": int(batch_size),
        "deterministic": bool(deterministic),
    }
