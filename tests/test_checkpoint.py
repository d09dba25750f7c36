"""Checkpoints: the size of model + optimizer whatever the proxy state, exact resume, no temp files."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from proxyattention import checkpoint, paths
from proxyattention import train as train_mod
from proxyattention.config import TrialConfig
from proxyattention.proxy import ProxyLayer


def _cfg(tmp_path, schedule="1,p,1", **train_kw):
    cfg = OmegaConf.structured(TrialConfig)
    cfg.model.name = "test_resnet"
    cfg.dataset.cache_dir = str(tmp_path / "cache")
    cfg.proxy.schedule = schedule
    cfg.train.progress = False
    for k, v in train_kw.items():
        cfg.train[k] = v
    return cfg


def test_epoch_checkpoint_does_not_grow_with_the_proxy_state(tmp_path):
    trial = train_mod.set_up(_cfg(tmp_path), tmp_path / "t")
    checkpoint.save(trial.out, train_mod.snapshot(trial))
    empty = (trial.out / paths.CHECKPOINT).stat().st_size
    trial.proxies.record(ProxyLayer(torch.arange(20_000), torch.rand(20_000, 4, 4), True))
    state_file = checkpoint.save_proxy_state(trial.out, trial.proxies.state_dict())
    checkpoint.save(trial.out, train_mod.snapshot(trial))
    assert (trial.out / paths.CHECKPOINT).stat().st_size <= empty * 1.01
    assert state_file.stat().st_size > 20_000 * 4 * 16  # the maps live in their own file
    saved = checkpoint.load(trial.out, trial.trial_id)
    assert saved["proxy_version"] == 1 and saved["proxy_state"]["layers"][0]["index"].numel() == 20_000


def test_resume_loads_the_proxy_state_its_checkpoint_names(tmp_path):
    """Stopped between a proxy step and that epoch's checkpoint: the older state is the right one."""
    out = tmp_path / "t"
    trial = train_mod.set_up(_cfg(tmp_path), out)
    trial.proxies.record(ProxyLayer(torch.tensor([1, 2]), torch.rand(2, 4, 4), True))
    checkpoint.save_proxy_state(out, trial.proxies.state_dict())
    checkpoint.save(out, train_mod.snapshot(trial))  # names version 1
    trial.proxies.record(ProxyLayer(torch.tensor([3]), torch.rand(1, 4, 4), True))
    checkpoint.save_proxy_state(out, trial.proxies.state_dict())  # version 2, then the trial dies
    saved = checkpoint.load(out, trial.trial_id)
    assert saved["proxy_state"]["version"] == 1
    assert saved["proxy_state"]["layers"][0]["index"].tolist() == [1, 2]
    checkpoint.save(out, train_mod.snapshot(trial))  # the next epoch checkpoint prunes older states
    assert sorted(p.name for p in out.glob("proxy_state.*")) == ["proxy_state.2.pt"]


def test_an_interrupted_save_leaves_no_temp_file(tmp_path, monkeypatch):
    out = tmp_path / "t"
    trial = train_mod.set_up(_cfg(tmp_path), out)
    checkpoint.save(out, train_mod.snapshot(trial))
    before = (out / paths.CHECKPOINT).read_bytes()

    def interrupted(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(out, train_mod.snapshot(trial))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert (out / paths.CHECKPOINT).read_bytes() == before  # the last good checkpoint is intact
    # A writer killed with -9 cannot clean up: the next load does.
    (out / f".{paths.CHECKPOINT}.host.1.abcd.tmp").write_bytes(b"x")
    (out / ".proxy_state.3.pt.host.1.abcd.tmp").write_bytes(b"x")
    monkeypatch.undo()
    checkpoint.load(out, trial.trial_id)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_batch_size_is_chosen_once_and_kept_on_resume(tmp_path, monkeypatch):
    out = tmp_path / "t"
    cfg = _cfg(tmp_path, schedule="1,p,1", batch_size="auto")
    calls = []

    def first_then_other(*a, **kw):
        calls.append(1)
        return 24 if len(calls) == 1 else 40  # as if a resumed cell landed on another GPU

    monkeypatch.setattr(train_mod, "choose_batch_size", first_then_other)
    trial = train_mod.set_up(cfg, out)
    row = train_mod.train_epoch(trial, 1)
    row.update(train_mod.validate(trial))
    train_mod.end_epoch(trial, 1, row)
    assert trial.batch_size == 24
    result = train_mod.train(cfg, out)  # resumes after epoch 1
    assert len(calls) == 1, "a resumed trial must not search the batch size again"
    assert result["run"]["batch_size"] == 24 and result["device"]["batch_size"] == 24
    assert result["resumed_from_epoch"] == 1
    assert json.loads((out / "result.json").read_text())["run"]["steps"] == result["run"]["steps"] > 0
