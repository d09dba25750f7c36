"""Shared test fixtures: the repository root and running the project's command-line modules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    return REPO


def _run_module(module: str, *args: str, cwd: Path, env: Optional[dict] = None, timeout: float = 600,
                check: bool = False) -> subprocess.CompletedProcess:
    """``python -m module args…`` in ``cwd``, text output captured; ``env`` entries extend os.environ."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"python -m {module} {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture
def run_module() -> Callable[..., subprocess.CompletedProcess]:
    """``run_module("launcher.status", str(d), "--json", cwd=tmp_path)`` → CompletedProcess."""
    return _run_module


@pytest.fixture(autouse=True)
def _own_cell_store(tmp_path_factory, monkeypatch):
    """Each test gets its own cell store (sweeps share cells through it; tests must not)."""
    monkeypatch.setenv("PROXYATTENTION_STORE", str(tmp_path_factory.mktemp("store")))


@pytest.fixture(scope="module")
def composer_fn():
    """Compose the project's config from override lists, as the launcher does (one Hydra context per module)."""
    from hydra import compose, initialize_config_dir

    from proxyattention.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        yield lambda overrides: compose("config", overrides=overrides)


@pytest.fixture
def done_cell() -> Callable[..., Path]:
    """Make a DONE cell the store trusts: ``done_cell(cell_dir, result)`` writes ``result.json`` as the
    trial does (indented; ``compact=True``: on one line, as the stand-in cell does) and a DONE
    ``status.json`` recording its size, as a launcher does when the cell ends."""
    import json

    from launcher import cellstate, fileio
    from launcher.cellstate import CellState, CellStatus, Owner

    def make(cell: Path, result: dict, compact: bool = False) -> Path:
        cell.mkdir(parents=True, exist_ok=True)
        if compact:
            (cell / fileio.RESULT).write_text(json.dumps(result))
        else:
            fileio.write_json_atomic(cell / fileio.RESULT, result)
        started = CellStatus().started_by(Owner.this_process(), pid=1)
        cellstate.write_status(cell, started.finished(CellState.DONE, exit_code=0, metrics={"test/acc": 0.5},
                                                      result_size=cellstate.result_size(cell)))
        return cell

    return make


@pytest.fixture
def trial_config() -> Callable[..., object]:
    """``trial_config(threshold, weight=None, subset=None)``: a proxy trial's config (test_resnet, schedule
    ``1,p,1``) for hand-made sweep folders."""
    from omegaconf import OmegaConf

    from proxyattention.config import TrialConfig

    def make(threshold: float, weight: Optional[float] = None, subset: Optional[float] = None):
        cfg = OmegaConf.structured(TrialConfig)
        cfg.model.name = "test_resnet"
        cfg.dataset.cache_dir = "/tmp/unused"
        cfg.proxy.schedule, cfg.proxy.threshold = "1,p,1", threshold
        if weight is not None:
            cfg.proxy.weight = weight
        if subset is not None:
            cfg.proxy.subset = subset
        cfg.explain.val_images = 16
        return cfg

    return make


@pytest.fixture
def trial_cell() -> Callable[..., str]:
    """``trial_cell(sweep, cfg, metrics)``: a DONE cell of ``cfg`` in ``sweep/cells`` (``test/acc`` 0.7 unless
    ``metrics`` says otherwise); returns its id."""
    import json

    from omegaconf import OmegaConf

    from proxyattention.identity import cell_id

    def make(sweep: Path, cfg, metrics: dict) -> str:
        cid = cell_id(cfg)
        d = sweep / "cells" / cid
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (d / "status.json").write_text(json.dumps({"state": "DONE", "attempts": 1, "error": None}))
        (d / "result.json").write_text(json.dumps({
            "status": "done", "trial_id": cid, "metrics": {"test/acc": 0.7, "test/loss": 0.5, **metrics},
            "timing": {"total_s": 1.0}, "history": [], "run": {"target_layer": "layer3", "epochs": 2},
            "data": {"split": "x"}}))
        return cid

    return make


from fakecell import fake  # noqa: E402,F401  (the stand-in cell's launcher fixture, for every test file)
