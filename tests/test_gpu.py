"""GPU paths: mixed precision, data held on the device, CAMs on the device. Skipped without CUDA."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from proxyattention import train as train_mod
from proxyattention.cam import compute_cams
from proxyattention.config import ModelConfig, TrialConfig
from proxyattention.models import build_model, find_target_layer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")]


def test_amp_choice_matches_the_device():
    cuda = torch.device("cuda")
    p = train_mod.Precision.choose(True, True, cuda)
    no_fp16 = train_mod.Precision.choose(True, False, cuda)  # model.amp=false (ViT)
    if torch.cuda.get_device_capability() >= (8, 0):  # native bf16; a V100 (7.0) gets fp16 + scaler
        assert p.dtype == torch.bfloat16 and p.scaler is None
        assert no_fp16.dtype == torch.bfloat16
    else:
        assert p.dtype == torch.float16 and p.scaler is not None
        assert no_fp16.dtype is None
    assert train_mod.Precision.choose(False, True, cuda).dtype is None


def test_trial_on_gpu_with_amp_and_auto_batch_size(tmp_path):
    cfg = OmegaConf.structured(TrialConfig)
    cfg.model.name = "test_resnet"
    cfg.dataset.cache_dir = str(tmp_path / "cache")
    cfg.proxy.schedule = "1,p,1"
    cfg.train.batch_size = "auto"
    cfg.train.channels_last = True
    cfg.train.progress = False
    result = train_mod.train(cfg, tmp_path / "t")
    assert result["run"]["device"].startswith("cuda") and result["run"]["amp"] is not None
    assert result["data"]["in_memory"] and result["run"]["batch_size"] >= 2
    assert result["metrics"]["proxy/images"] > 0
    saved = json.loads((tmp_path / "t" / "result.json").read_text())
    assert saved["status"] == "done"
    block = saved["device"]
    assert block["type"] == "cuda" and block["name"] == torch.cuda.get_device_name()
    assert block["capability"] == ".".join(map(str, torch.cuda.get_device_capability()))
    assert block["precision"] in ("bf16", "fp16") and block["batch_size"] == result["run"]["batch_size"]


def test_this_gpu_has_kernels_in_the_installed_build():
    from proxyattention.device import has_kernels, resolve_device

    assert has_kernels(torch.cuda.get_device_capability(), torch.cuda.get_arch_list())
    assert resolve_device("auto").type == "cuda"


def test_native_cam_on_gpu_matches_cpu():
    torch.manual_seed(0)
    model = build_model(OmegaConf.structured(ModelConfig(name="test_resnet")), 10, 64)
    target = find_target_layer(model, 64)
    images = torch.randn(8, 3, 64, 64)
    targets = torch.arange(8) % 10
    cpu = compute_cams(model, images, targets, "gradcampp", target)
    model.cuda()
    gpu = compute_cams(model, images.cuda(), targets.cuda(), "gradcampp", target)
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max().item() < 1e-3
