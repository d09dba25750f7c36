"""Device choice on machines this suite cannot be: a V100 under a CUDA 13 build, a node without its GPU.

The GPU is simulated by replacing torch.cuda's queries (availability, capability, architecture list,
name); tests/test_gpu.py runs the real paths when a GPU is present.
"""

import pytest
import torch

from launcher.cellstate import REQUIRE_GPU_ENV
from proxyattention import device as dev
from proxyattention.config import ConfigError

CUDA13_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
CUDA126_ARCHS = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]


def simulate_gpu(monkeypatch, name="Tesla V100-SXM2-32GB", capability=(7, 0), archs=CUDA13_ARCHS,
                 available=True):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(archs))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


@pytest.mark.parametrize("capability, archs, fits", [
    ((7, 0), CUDA13_ARCHS, False),  # V100 under CUDA 13: no sm_70 cubin, no older PTX
    ((7, 0), CUDA126_ARCHS, True),
    ((8, 6), ["sm_80"], True),  # same major, newer minor runs the sm_80 cubin
    ((8, 0), ["sm_86"], False),  # but not the other way round
    ((9, 0), ["sm_80", "compute_80"], True),  # PTX is compiled for newer GPUs
    ((7, 0), ["sm_75", "compute_75"], False),
    ((12, 0), ["sm_90a", "sm_120"], True),
    ((7, 0), [], True),  # a build that lists nothing is not second-guessed
])
def test_kernel_match_follows_cuda_compatibility(capability, archs, fits):
    assert dev.has_kernels(capability, archs) is fits


def test_a_v100_under_a_cuda13_build_is_refused_in_one_line(monkeypatch):
    simulate_gpu(monkeypatch)
    with pytest.raises(ConfigError) as e:
        dev.resolve_device("auto")
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("Tesla V100-SXM2-32GB", "7.0", "sm_70", "sm_75 sm_80", "CUDA 12.6"):
        assert part in msg


def test_the_v100_refusal_names_builds_that_still_have_sm70(monkeypatch):
    """cu128 builds lost sm_70 from torch 2.11 on: the recipe pins the cu126 index (sm_70 through 2.14)
    or PyPI's 2.10 with its matching torchvision, never an unpinned `cu12x` install."""
    simulate_gpu(monkeypatch, archs=["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"])
    with pytest.raises(ConfigError) as e:
        dev.resolve_device("auto")
    msg = str(e.value)
    assert "\n" not in msg
    assert ('pip install "torch<=2.14.1" torchvision --index-url https://download.pytorch.org/whl/cu126'
            in msg)
    assert 'pip install "torch==2.10.*" "torchvision==0.25.*"' in msg
    assert "cu128" not in msg


def test_other_refused_gpus_get_their_own_architecture_not_the_volta_recipe(monkeypatch):
    simulate_gpu(monkeypatch, name="GeForce GTX 1080", capability=(6, 1))
    with pytest.raises(ConfigError) as e:
        dev.resolve_device("auto")
    msg = str(e.value)
    assert "sm_61" in msg and "get_arch_list" in msg and "torch==2.10" not in msg
    assert dev.install_hint((7, 2)) == dev.install_hint((7, 0))  # Jetson Xavier runs the sm_70 cubins
    assert "torch==2.10" in dev.GPU_INSTALL_HINT  # no GPU to ask: the cluster's V100 recipe


def test_a_v100_under_a_cuda12_build_trains_on_it(monkeypatch):
    simulate_gpu(monkeypatch, archs=CUDA126_ARCHS)
    assert dev.resolve_device("auto").type == "cuda"
    assert dev.resolve_device("cpu").type == "cpu"  # asked for explicitly


def test_auto_falls_back_to_the_cpu_only_when_no_gpu_is_required(monkeypatch):
    simulate_gpu(monkeypatch, available=False)
    monkeypatch.delenv(REQUIRE_GPU_ENV, raising=False)
    assert dev.resolve_device("auto").type == "cpu"
    monkeypatch.setenv(REQUIRE_GPU_ENV, "1")
    with pytest.raises(ConfigError, match=REQUIRE_GPU_ENV):
        dev.resolve_device("auto")
    with pytest.raises(ConfigError, match="train.device=cuda"):
        dev.resolve_device("cuda")
    monkeypatch.setenv(REQUIRE_GPU_ENV, "0")
    assert dev.resolve_device("auto").type == "cpu"


@pytest.mark.parametrize("capability, dtype, scaled", [((7, 0), torch.float16, True),
                                                       ((7, 5), torch.float16, True),
                                                       ((8, 0), torch.bfloat16, False),
                                                       ((9, 0), torch.bfloat16, False)])
def test_precision_by_capability_not_by_emulated_bf16(monkeypatch, capability, dtype, scaled):
    simulate_gpu(monkeypatch, capability=capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: object())  # no CUDA to build one on
    p = dev.Precision.choose(True, True, torch.device("cuda"))
    assert p.dtype == dtype and (p.scaler is not None) == scaled
    assert p.name == {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    assert dev.Precision.choose(False, True, torch.device("cuda")).name == "fp32"


@pytest.mark.parametrize("capability, name", [((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"),
                                              ((9, 0), "bf16")])
def test_a_model_without_fp16_takes_bf16_where_the_gpu_has_it(monkeypatch, capability, name):
    """model.amp=false (ViT) means "not fp16": bf16 from capability 8.0, fp32 below; train.amp=false and
    the CPU are fp32 whatever the model says."""
    simulate_gpu(monkeypatch, capability=capability)
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: object())
    p = dev.Precision.choose(True, False, torch.device("cuda"))
    assert p.name == name and p.scaler is None
    assert dev.Precision.choose(False, False, torch.device("cuda")).name == "fp32"
    assert dev.Precision.choose(True, False, torch.device("cpu")).name == "fp32"
    assert dev.Precision.choose(True, True, torch.device("cpu")).name == "fp32"


@pytest.fixture
def backends_kept(monkeypatch):
    """configure_backends changes process-wide torch settings: put them back after the test."""
    monkeypatch.delenv(dev.CUBLAS_WORKSPACE_ENV, raising=False)  # restored (or removed) at teardown
    kept = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.use_deterministic_algorithms(kept[0], warn_only=kept[1])
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.allow_tf32) = kept[2:]


def _backends() -> dict:
    import os

    return {"algorithms": torch.are_deterministic_algorithms_enabled(),
            "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
            "cudnn.deterministic": torch.backends.cudnn.deterministic,
            "cudnn.benchmark": torch.backends.cudnn.benchmark,
            "matmul.tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn.tf32": torch.backends.cudnn.allow_tf32,
            "cublas": os.environ.get(dev.CUBLAS_WORKSPACE_ENV)}


def test_deterministic_backends_on_cuda_and_back(backends_kept):
    cuda, bf16 = torch.device("cuda"), dev.Precision(torch.bfloat16, None)
    dev.configure_backends(cuda, True, bf16)
    b = _backends()
    assert b["algorithms"] and b["warn_only"] and b["cudnn.deterministic"] and not b["cudnn.benchmark"]
    assert b["cublas"] == ":4096:8" and not b["matmul.tf32"]  # bf16 trial: fp32 matmuls stay fp32
    dev.configure_backends(cuda, False, bf16)  # today's behaviour: autotuned cuDNN, nothing forced
    b = _backends()
    assert not b["algorithms"] and not b["cudnn.deterministic"] and b["cudnn.benchmark"]
    dev.configure_backends(torch.device("cpu"), False, dev.Precision(None, None))
    b = _backends()
    assert not b["algorithms"] and not b["cudnn.benchmark"] and not b["matmul.tf32"]


def test_a_cublas_workspace_already_set_is_kept(backends_kept, monkeypatch):
    monkeypatch.setenv(dev.CUBLAS_WORKSPACE_ENV, ":16:8")  # the other setting PyTorch documents
    dev.configure_backends(torch.device("cuda"), True, dev.Precision(None, None))
    assert _backends()["cublas"] == ":16:8"


@pytest.mark.parametrize("deterministic", [False, True])
def test_an_fp32_trial_on_cuda_uses_tf32_deterministic_or_not(backends_kept, monkeypatch, deterministic):
    """TF32 gives the same outputs for the same inputs, so train.deterministic keeps it."""
    fp32 = dev.Precision(None, None)
    dev.configure_backends(torch.device("cuda"), deterministic, fp32)
    assert _backends()["matmul.tf32"] and _backends()["cudnn.tf32"]
    simulate_gpu(monkeypatch, name="NVIDIA A100-SXM4-80GB", capability=(8, 0))
    info = dev.device_info(torch.device("cuda"), fp32, 64, deterministic)
    assert info["precision"] == "fp32" and info["tf32"] is True and info["deterministic"] is deterministic
    assert info["name"] == "NVIDIA A100-SXM4-80GB" and info["capability"] == "8.0"
    simulate_gpu(monkeypatch, capability=(7, 0))  # no TF32 units on a V100: the flag changes nothing
    assert dev.device_info(torch.device("cuda"), fp32, 64)["tf32"] is False
    assert dev.device_info(torch.device("cpu"), fp32, 64)["deterministic"] is False


def test_set_up_passes_both_amp_flags_and_train_deterministic(monkeypatch, tmp_path, backends_kept):
    """The trial's set-up: ViT (model.amp=false) on an A100 computes in bf16, and train.deterministic
    reaches the backends before anything runs on the GPU."""
    from omegaconf import OmegaConf

    from proxyattention import train as train_mod
    from proxyattention.config import TrialConfig, to_trial_config

    simulate_gpu(monkeypatch, name="NVIDIA A100-SXM4-80GB", capability=(8, 0))
    monkeypatch.delenv(REQUIRE_GPU_ENV, raising=False)
    seen = {}

    class Stop(Exception):
        pass

    def configure(device, deterministic, precision):
        seen.update(device=device.type, deterministic=deterministic, precision=precision.name)
        raise Stop  # nothing after this may touch the simulated GPU

    monkeypatch.setattr(train_mod, "configure_backends", configure)
    cfg = OmegaConf.structured(TrialConfig)
    cfg.model.name, cfg.model.amp = "test_vit", False
    cfg.dataset.cache_dir = str(tmp_path / "cache")
    cfg.train.deterministic = True
    with pytest.raises(Stop):
        train_mod.set_up(to_trial_config(cfg), tmp_path / "t")
    assert seen == {"device": "cuda", "deterministic": True, "precision": "bf16"}


def test_a_refused_gpu_ends_the_trial_with_exit_2_and_one_line(monkeypatch, tmp_path, capsys):
    from omegaconf import OmegaConf

    from proxyattention.config import TrialConfig
    from proxyattention.train import run_trial

    simulate_gpu(monkeypatch)
    cfg = OmegaConf.structured(TrialConfig)
    cfg.model.name = "test_resnet"
    cfg.dataset.cache_dir = str(tmp_path / "cache")
    cfg.train.progress = False
    assert run_trial(cfg, tmp_path / "t") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: GPU Tesla V100") and "sm_70" in err[0]
    assert (tmp_path / "t" / "error.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure on a machine without CUDA")
def test_cuda_without_a_gpu_fails_in_seconds_from_the_command_line(tmp_path):
    import os
    import subprocess
    import sys
    import time

    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "proxyattention.train", "train.device=cuda", "model=test_resnet",
                           f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True,
                          env={**os.environ, "PROXYATTENTION_CACHE": str(tmp_path / "cache")}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.device=cuda" in proc.stderr
    assert time.time() - t0 < 60
