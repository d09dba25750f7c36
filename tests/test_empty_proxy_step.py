"""A proxy step with no mistakes to explain, in every storage mode of the image bank.

A model at 100% training accuracy before a ``p`` gives the step nothing to do: it must compute no CAM,
record an empty layer (every image stays its original) and let the trial go on — on decoded arrays
held on the device, on the device at their stored size, on the host, and on image files streamed by
the loader's workers.
"""

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from proxyattention import proxy as proxy_mod
from proxyattention import train as train_mod
from proxyattention.config import DatasetConfig, MethodConfig, ProxyConfig, TrialConfig
from proxyattention.data.bank import ImageBank
from proxyattention.data.registry import load_samples
from proxyattention.proxy import ProxyState, proxy_step

COLOURS = {"blue": (0, 0, 255), "red": (255, 0, 0)}


def solid_folder(root, per_class: int = 12, size: int = 20):
    """Two classes of solid-colour PNGs: as separable as images get."""
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size, size), rgb).save(root / name / f"{i:02d}.png")
    return root


def _bank(mode: str, tmp_path) -> ImageBank:
    cache = str(tmp_path / "cache")
    if mode.startswith("files"):
        root = solid_folder(tmp_path / "data")
        cfg = OmegaConf.structured(DatasetConfig(name="imagefolder", source="imagefolder", root=str(root),
                                                 cache_dir=cache))
        in_memory = "yes" if mode == "files->device" else "no"
        return ImageBank(load_samples(cfg), 32, torch.device("cpu"), in_memory, None, 1)
    samples = load_samples(OmegaConf.structured(DatasetConfig(cache_dir=cache)))  # digits: 8x8 arrays
    if mode == "device":
        return ImageBank(samples, 32, torch.device("cpu"), "yes", None, 0)
    if mode == "device-stored":  # the cap holds the 8x8 arrays, not the 32 px images
        return ImageBank(samples, 32, torch.device("cpu"), "auto", 1, 0)
    return ImageBank(samples, 32, torch.device("cpu"), "no", None, 0)


@pytest.fixture(scope="module")
def tiny():
    import timm

    from proxyattention.models import find_target_layer

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10).eval()
    return model, find_target_layer(model, 32, None)


@pytest.mark.parametrize("mode, expected", [("device", "device"), ("device-stored", "device-stored"),
                                            ("host", "host"), ("files", "files"), ("files->device", "device")])
def test_a_step_without_mistakes_explains_nothing_and_keeps_every_original(tiny, tmp_path, monkeypatch, mode,
                                                                          expected):
    model, layer = tiny
    bank = _bank(mode, tmp_path)
    assert bank.mode == expected
    n = bank.labels.numel()
    empty = torch.zeros(0, dtype=torch.long)
    assert list(bank.batches(empty, 4)) == []  # no batch at all, not one empty batch
    got = bank.get(empty)
    assert got.shape == (0, 3, 32, 32) and got.dtype == torch.uint8

    explained = []
    real_explain = proxy_mod.explain_batch
    monkeypatch.setattr(proxy_mod, "explain_batch", lambda *a, **k: explained.append(1) or real_explain(*a, **k))
    proxy, method = ProxyConfig(log_images=4), MethodConfig(batch_size=4)
    state = ProxyState(proxy, 32, torch.device("cpu"))
    mistakes = torch.full((n,), -1, dtype=torch.int32)  # the model got every image right
    step = proxy_step(model, bank, state, mistakes, proxy, method, layer, torch.Generator().manual_seed(0),
                      dump_dir=tmp_path / "dump")
    assert explained == []  # no CAM computed
    s = step.stats
    assert (s["misclassified"], s["chosen"], s["now_correct"], s["pixels_changed"], s["proxies"]) == (0, 0, 0, 0.0, 0)
    assert step.before.shape == step.after.shape == (0, 3, 32, 32)
    assert not (tmp_path / "dump").exists()
    assert len(state) == 0 and state.version == 1 and state.layers[-1].index.numel() == 0
    idx = torch.arange(min(n, 6))
    assert torch.equal(state.apply(idx, bank.get(idx)), bank.get(idx))  # originals, unchanged
    restored = ProxyState(proxy, 32, torch.device("cpu"))
    restored.load_state_dict(state.state_dict())
    assert len(restored) == 0 and restored.version == 1

    class Writer:
        images = 0

        def add_image(self, *a, **k):
            self.images += 1

    writer = Writer()
    train_mod.log_examples(writer, step.before, step.after, 1)
    assert writer.images == 0


def test_a_file_backed_trial_at_full_training_accuracy_passes_its_proxy_step(tmp_path, monkeypatch):
    """The done-when case: image files streamed by a loader worker (``dataset.in_memory=no``), a model
    that makes no mistake in the epoch before its ``p``; the trial ends DONE."""
    root = solid_folder(tmp_path / "data", per_class=16)
    monkeypatch.setenv("PROXYATTENTION_CACHE", str(tmp_path / "cache"))
    cfg = OmegaConf.structured(TrialConfig)
    cfg.dataset.name, cfg.dataset.source, cfg.dataset.root = "imagefolder", "imagefolder", str(root)
    cfg.dataset.image_size, cfg.dataset.in_memory, cfg.dataset.num_workers = 16, "no", 1
    cfg.dataset.cache_dir = str(tmp_path / "cache")
    cfg.model.name = "test_resnet"
    cfg.proxy.schedule = "4,p,1"
    # Mixed batches of 8: with only one colour in a batch, BatchNorm would normalise the colour away.
    cfg.train.batch_size, cfg.train.progress, cfg.explain.enabled = 8, False, False
    out = tmp_path / "trial"
    assert train_mod.run_trial(cfg, out) == 0, (out / "error.json").read_text() if (out / "error.json").exists() else ""
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "done" and result["data"]["in_memory"] is False
    assert result["history"][3]["train/acc"] == 1.0  # the epoch just before the step made no mistake
    (step,) = result["proxy_steps"]
    assert step["after_epoch"] == 4 and step["misclassified"] == 0 and step["chosen"] == 0
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3, 4, 5]
    assert np.isfinite(result["metrics"]["test/acc"])
    state = torch.load(out / "proxy_state.1.pt", weights_only=True)
    assert sum(layer["index"].numel() for layer in state["layers"]) == 0
