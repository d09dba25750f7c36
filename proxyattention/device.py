"""The training device and its numeric precision.

``train.device=auto`` takes CUDA when torch sees a GPU, else the CPU — unless the cell runs under a GPU
launcher profile (``PROXYATTENTION_REQUIRE_GPU=1``, set by ``hydra/launcher=slurm_v100`` and by the local
launcher when it pins cells to GPUs), where a missing or unusable GPU is an error, never a silent CPU run.
A GPU the installed torch has no kernels for (a V100, sm_70, under a CUDA 13 build) is refused at trial
start with a one-line error naming the GPU, its capability, the build's architectures and the fix.
Mixed precision (``train.amp``, ``model.amp``) applies on CUDA only: bf16 from capability 8.0, fp16 with
a gradient scaler below (bf16 has no tensor-core path on a V100).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from proxyattention.cellstate import REQUIRE_GPU_ENV
from proxyattention.config import ConfigError

log = logging.getLogger(__name__)

GPU_INSTALL_HINT = ("install a PyTorch build whose architecture list includes it (for a V100: a CUDA 12.x "
                    "build, e.g. `pip install torch torchvision --index-url "
                    "https://download.pytorch.org/whl/cu126`; see the README's GPU clusters section)")


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
        f"{' '.join(archs)}); {GPU_INSTALL_HINT}")


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
    """Mixed precision on CUDA: bf16 where supported, else fp16 with a gradient scaler."""

    dtype: Optional[torch.dtype]
    scaler: Optional[torch.amp.GradScaler]

    @classmethod
    def choose(cls, enabled: bool, device: torch.device) -> "Precision":
        """bf16 where the GPU computes it natively (capability 8.0 and newer), fp16 + scaler below."""
        if not enabled or device.type != "cuda":
            return cls(None, None)
        if torch.cuda.get_device_capability(device) >= (8, 0):
            return cls(torch.bfloat16, None)
        return cls(torch.float16, torch.amp.GradScaler("cuda"))

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")

    def autocast(self, device: torch.device) -> Any:
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None)


def configure_backends(device: torch.device) -> None:
    """Let cuDNN pick the fastest convolution algorithms for the trial's fixed input shapes."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def device_info(device: torch.device, precision: Precision, batch_size: int) -> dict[str, Any]:
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
        "batch_size": int(batch_size),
    }
