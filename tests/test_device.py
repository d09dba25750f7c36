"""Device choice on machines this suite cannot be: a V100 under a CUDA 13 build, a node without its GPU.

The GPU is simulated by replacing torch.cuda's queries (availability, capability, architecture list,
name); tests/test_gpu.py runs the real paths when a GPU is present.
"""

import pytest
import torch

from proxyattention import device as dev
from proxyattention.cellstate import REQUIRE_GPU_ENV
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
    for part in ("Tesla V100-SXM2-32GB", "7.0", "sm_70", "sm_75 sm_80", "CUDA 12", "download.pytorch.org/whl/cu12"):
        assert part in msg


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
    p = dev.Precision.choose(True, torch.device("cuda"))
    assert p.dtype == dtype and (p.scaler is not None) == scaled
    assert p.name == {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    assert dev.Precision.choose(False, torch.device("cuda")).name == "fp32"


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
