"""End-to-end trials on the embedded digits with a tiny model, through the real command line."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from proxyattention import train as train_mod
from proxyattention.checkpoint import CheckpointError
from proxyattention.config import TrialConfig

FAST = ["dataset=digits", "model=test_resnet", "train.progress=false"]


def cli(out: Path, *overrides: str, cache: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROXYATTENTION_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "proxyattention.train", *FAST, *overrides,
                           f"hydra.run.dir={out}"], capture_output=True, text=True, env=env, **kw)


def trial_cfg(tmp_path: Path, schedule: str = "1,p,1", enabled: bool = True, **train_kw):
    cfg = OmegaConf.structured(TrialConfig)
    cfg.model.name = "test_resnet"
    cfg.dataset.cache_dir = str(tmp_path / "cache")
    cfg.proxy.schedule = schedule
    cfg.proxy.enabled = enabled
    cfg.train.progress = False
    for k, v in train_kw.items():
        cfg.train[k] = v
    return cfg


@pytest.mark.floors
@pytest.mark.slow
def test_cli_trial_leaves_a_complete_record(tmp_path):
    out = tmp_path / "trial"
    r = cli(out, "proxy.schedule=1,p,1", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr[-3000:]
    assert str(out / "result.json") in r.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "done"
    m = result["metrics"]
    assert 0.0 <= m["test/acc"] <= 1.0 and 0.0 <= m["val/acc_best"] <= 1.0
    assert m["test/acc"] > 0.2  # ten classes: better than chance after two epochs
    assert m["proxy/images"] > 0 and m["proxy/steps"] == 1
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert set(result["timing"]) >= {"train_s", "proxy_s", "eval_s", "total_s"}
    assert result["config"]["proxy"]["schedule"] == "1,p,1"
    (step,) = result["proxy_steps"]  # the default target explains the wrong class of each mistake
    assert step["chosen"] > 0 and 0 <= step["now_correct"] <= step["chosen"] and step["explained_true"] == 0
    assert result["device"]["type"] == "cpu" and result["device"]["precision"] == "fp32"
    assert result["device"]["batch_size"] == result["run"]["batch_size"]
    assert OmegaConf.load(out / "config.yaml").model.name == "test_resnet"
    assert not (out / "error.json").exists()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(out / "tb")).Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/acc", "val/acc", "proxy/images", "proxy/pixels_changed", "test/acc"} <= tags
    assert ea.Scalars("proxy/images")[0].value == m["proxy/images"]
    assert "proxy/examples" in ea.Tags()["images"]


def test_bad_override_fails_before_data_is_loaded(tmp_path):
    out = tmp_path / "bad"
    r = cli(out, "proxy.threshold=1.5", cache=tmp_path / "cache")
    assert r.returncode == 2
    assert "proxy.threshold" in r.stderr and "[0.0, 1.0]" in r.stderr
    assert not (tmp_path / "cache").exists()  # no split was made: nothing was loaded
    assert json.loads((out / "error.json").read_text())["type"] == "ConfigError"


def test_proxy_and_baseline_are_paired(tmp_path):
    """Same init, order and augmentation until the proxy step; same number of optimizer steps."""
    proxy = train_mod.train(trial_cfg(tmp_path, "1,p,1"), tmp_path / "proxy")
    base = train_mod.train(trial_cfg(tmp_path, "1,p,1", enabled=False), tmp_path / "base")
    keys = ("train/loss", "train/acc", "val/loss", "val/acc", "lr")
    assert [proxy["history"][0][k] for k in keys] == [base["history"][0][k] for k in keys]
    assert proxy["history"][1]["train/loss"] != base["history"][1]["train/loss"]  # proxies were used
    assert base["metrics"]["proxy/images"] == 0
    assert proxy["data"]["split"] == base["data"]["split"]
    ck_p = torch.load(tmp_path / "proxy" / "checkpoint.pt", weights_only=True)
    ck_b = torch.load(tmp_path / "base" / "checkpoint.pt", weights_only=True)
    assert ck_p["scheduler"]["last_epoch"] == ck_b["scheduler"]["last_epoch"] > 0
    # The proxy state (saved apart from the epoch checkpoint) holds exactly the proxied images.
    assert ck_p["proxy_version"] == 1 and ck_b["proxy_version"] == 0
    state = torch.load(tmp_path / "proxy" / "proxy_state.1.pt", weights_only=True)
    assert sum(layer["index"].numel() for layer in state["layers"]) == proxy["metrics"]["proxy/images"]
    assert not list((tmp_path / "base").glob("proxy_state.*"))
    assert "overlay" not in ck_p and "proxy_state" not in ck_p


@pytest.mark.floors
@pytest.mark.slow
def test_killed_trial_resumes_to_the_same_result(tmp_path):
    args = ("proxy.schedule=2,p,2", "train.num_threads=1")
    ref = cli(tmp_path / "ref", *args, cache=tmp_path / "cache")
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "killed"
    env = {**os.environ, "PROXYATTENTION_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "proxyattention.train", *FAST, *args,
                             f"hydra.run.dir={out}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline:
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["epoch"] >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "result.json").exists()
    again = cli(out, *args, cache=tmp_path / "cache")
    assert again.returncode == 0, again.stderr[-3000:]
    a = json.loads((tmp_path / "ref" / "result.json").read_text())
    b = json.loads((out / "result.json").read_text())
    assert b["resumed_from_epoch"] is not None and b["resumed_from_epoch"] >= 2
    assert b["metrics"]["test/acc"] == a["metrics"]["test/acc"]
    assert [h["val/acc"] for h in b["history"]] == [h["val/acc"] for h in a["history"]]


def test_non_finite_loss_stops_with_error_json(tmp_path, monkeypatch):
    real_build = train_mod.build_model

    def poisoned(*a, **kw):
        model = real_build(*a, **kw)
        model.register_forward_hook(lambda m, i, o: o * float("nan"))
        return model

    monkeypatch.setattr(train_mod, "build_model", poisoned)
    out = tmp_path / "nan"
    assert train_mod.run_trial(trial_cfg(tmp_path, "2"), out) == 1
    err = json.loads((out / "error.json").read_text())
    assert err["type"] == "TrialError" and "non-finite" in err["error"] and "Traceback" in err["traceback"]
    assert not (out / "result.json").exists()


def test_checkpoint_from_another_config_is_refused(tmp_path):
    out = tmp_path / "t"
    train_mod.train(trial_cfg(tmp_path, "1"), out)
    with pytest.raises(CheckpointError, match="different trial config"):
        train_mod.train(trial_cfg(tmp_path, "1", seed=5), out)


def test_p_trains_counts_each_p_as_a_training_epoch(tmp_path):
    """As the thesis counted: 1,p,1 trains 3 epochs with the step after epoch 2; its baseline trains 3."""
    from proxyattention.identity import baseline_of

    cfg = trial_cfg(tmp_path, "1,p,1")
    cfg.proxy.p_trains = True
    result = train_mod.train(cfg, tmp_path / "p_trains")
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    assert [s["after_epoch"] for s in result["proxy_steps"]] == [2]
    assert result["run"]["epochs"] == 3
    base = baseline_of(cfg)
    assert base["proxy"]["schedule"] == "3" and not base["proxy"]["enabled"]
