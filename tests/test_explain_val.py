"""Explainability metrics on validation images (``explain.val_images``): what a search may select on
without the test split. Recorded as ``val/explain/*``, on the same seeded images for a cell and its
paired baseline, absent when the key is 0; the key leaves earlier cells' ids alone."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from proxyattention.sweep.app import check_objective
from proxyattention import explain as explain_mod
from proxyattention import identity
from proxyattention import train as train_mod
from proxyattention.config import ConfigError, TrialConfig, to_trial_config

METRICS = ("ad", "ai", "ag", "insertion", "deletion")


def tiny(tmp_path, schedule: str = "1,p,1", val_images: int = 16, enabled: bool = True):
    """A few-second trial: test_resnet on the embedded digits at 32 px, small explain settings."""
    cfg = OmegaConf.structured(TrialConfig)
    cfg.model.name = "test_resnet"
    cfg.dataset.cache_dir = str(tmp_path / "cache")
    cfg.proxy.schedule = schedule
    cfg.train.progress = False
    cfg.train.num_threads = 1
    cfg.explain.enabled = enabled
    cfg.explain.images = 16
    cfg.explain.steps = 4
    cfg.explain.val_images = val_images
    return cfg


def test_val_images_zero_keeps_every_earlier_cell_id():
    base = OmegaConf.to_container(OmegaConf.structured(TrialConfig), resolve=True)
    assert base["explain"]["val_images"] == 0
    assert identity.cell_id(base) == "d0e870306620"  # pinned in test_dataset_identity.py
    old = {**base, "explain": {k: v for k, v in base["explain"].items() if k != "val_images"}}
    assert identity.cell_id(old) == identity.cell_id(base)
    on = {**base, "explain": {**base["explain"], "val_images": 16}}
    assert identity.cell_id(on) != identity.cell_id(base)  # a cell that computes more is another cell
    proxy = {**on, "proxy": {**on["proxy"], "schedule": "1,p,1"}}
    assert identity.baseline_of(proxy)["explain"]["val_images"] == 16  # its baseline computes them too


def test_val_images_is_checked():
    with pytest.raises(ConfigError, match="explain.val_images"):
        to_trial_config({"explain": {"val_images": -1}})


def test_val_explain_metrics_are_an_objective_a_search_may_select_on():
    check_objective(["val/acc_best", "val/explain/insertion"])
    with pytest.raises(ValueError, match="hydra.launcher.objective"):
        check_objective("explain/insertion")  # the test-image one stays refused


def test_the_launcher_takes_any_metric_name_and_the_trials_refuse_test_metrics():
    """The rule on which metrics a search may select on is the trial app's; the launcher checks the shape."""
    from launcher import objective
    from proxyattention.sweep.app import TrialApp

    for spec in (None, "test/acc", ["loss", "return_value"]):
        objective.check_objective(spec)
    for spec in ("", [], 3, ["val/acc", ""]):
        with pytest.raises(ValueError, match="hydra.launcher.objective"):
            objective.check_objective(spec)
    with pytest.raises(ValueError, match="test split"):
        TrialApp().check_options({"objective": "test/acc"})
    TrialApp().check_options({"objective": None})  # null: val/acc_best
    assert objective.names(None, TrialApp.default_objective) == ["val/acc_best"]


def test_a_trial_and_its_baseline_record_val_explain_metrics_on_the_same_images(tmp_path, monkeypatch):
    chosen: list[tuple[int, int, torch.Tensor]] = []  # (pool size, count, indices) per call
    real = explain_mod.choose_images

    def spy(pool, count, seed):
        out = real(pool, count, seed)
        chosen.append((pool.numel(), count, out.clone()))
        return out

    monkeypatch.setattr(explain_mod, "choose_images", spy)
    cfg = tiny(tmp_path)
    proxy = train_mod.train(cfg, tmp_path / "proxy")
    proxy_calls, chosen[:] = list(chosen), []
    base_cfg = OmegaConf.merge(OmegaConf.structured(TrialConfig), identity.baseline_of(cfg))
    base = train_mod.train(base_cfg, tmp_path / "base")
    base_calls = list(chosen)

    for result in (proxy, base):
        m = result["metrics"]
        for name in METRICS:
            assert isinstance(m[f"val/explain/{name}"], float), name
            assert isinstance(m[f"explain/{name}"], float), name
        assert m["val/explain/images"] == 16 and m["explain/images"] == 16
        assert 0.0 <= m["val/explain/insertion"] <= 1.0 and 0.0 <= m["val/explain/deletion"] <= 1.0
    # Test images first, then validation images: each from its own split, the same for cell and baseline.
    assert [(n, c) for n, c, _ in proxy_calls] == [(proxy["data"]["test"], 16), (proxy["data"]["val"], 16)]
    assert [(n, c) for n, c, _ in base_calls] == [(n, c) for n, c, _ in proxy_calls]
    assert torch.equal(proxy_calls[1][2], base_calls[1][2]) and proxy_calls[1][2].numel() == 16
    assert not torch.equal(proxy_calls[0][2], proxy_calls[1][2])
    assert proxy["data"]["split"] == base["data"]["split"]


def test_without_val_images_no_val_explain_metric_and_they_need_not_the_test_ones(tmp_path):
    off = train_mod.train(tiny(tmp_path, "1", val_images=0, enabled=False), tmp_path / "off")
    assert not [k for k in off["metrics"] if "explain/" in k]
    only_val = train_mod.train(tiny(tmp_path, "1", val_images=8, enabled=False), tmp_path / "only_val")
    names = sorted(k for k in only_val["metrics"] if "explain/" in k)
    assert names == sorted(f"val/explain/{n}" for n in (*METRICS, "images"))
    assert only_val["metrics"]["val/explain/images"] == 8
