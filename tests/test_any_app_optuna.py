"""An Optuna study of any Hydra app (``hydra/sweeper=optuna``): each trial runs the app's task function as
a cell, the objective is what the task function returns, the study persists and a re-issue continues it
without running a DONE trial again (tests/apps/counter_app.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna", reason="the adaptive sweeper needs Optuna (pip install -e '.[test]')")

APP = Path(__file__).resolve().parent / "apps" / "counter_app.py"


def _study(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    counters = tmp_path / "counters"
    counters.mkdir(exist_ok=True)
    full = {**os.environ, "COUNTER_DIR": str(counters), "PROXYATTENTION_STORE": str(tmp_path / "store"),
            **(env or {})}
    return subprocess.run([sys.executable, str(APP), "-m", "hydra/launcher=local", "hydra/sweeper=optuna",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}", *args],
                          cwd=tmp_path, env=full, text=True, capture_output=True, timeout=300)


def _runs(tmp_path: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in (tmp_path / "counters").iterdir())


def test_a_study_of_another_app_maximises_its_return_value_and_resumes(tmp_path: Path) -> None:
    args = ("x=3", "scale=interval(1,2)", "hydra.sweeper.n_trials=3", "hydra.sweeper.direction=maximize",
            "hydra.sweeper.sampler.seed=0")
    first = _study(tmp_path, *args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert _runs(tmp_path) == 3
    assert "best return" in first.stdout and "val/acc_best" not in first.stdout  # the app's objective
    study = optuna.load_study(study_name="sweep",
                              storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
                                  str(tmp_path / "sweep" / "optuna.journal"))))
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    for t in trials:  # each value is the task function's return: x * scale
        assert t.value == pytest.approx(3 * t.params["scale"])
    assert study.best_value == max(t.value for t in trials)

    again = _study(tmp_path, *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert _runs(tmp_path) == 3  # the study has its trials: no job ran again
    status = subprocess.run([sys.executable, "-m", "launcher.status", str(tmp_path / "sweep"), "--json"],
                            cwd=tmp_path, text=True, capture_output=True, timeout=120, check=True)
    got = json.loads(status.stdout)
    assert got["study"]["complete"] == 3 and got["study"]["best_value"] == pytest.approx(study.best_value)


def test_a_failing_trial_of_another_app_is_a_failed_trial(tmp_path: Path) -> None:
    done = _study(tmp_path, "x=choice(1,2)", "hydra.sweeper.n_trials=4", "hydra/sweeper/sampler=bruteforce",
                  "hydra.sweeper.max_failure_rate=1.0", env={"FAIL_AT": "2"})
    study = optuna.load_study(study_name="sweep",
                              storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
                                  str(tmp_path / "sweep" / "optuna.journal"))))
    states = {t.params["x"]: t.state for t in study.get_trials()}
    assert states == {1: optuna.trial.TrialState.COMPLETE, 2: optuna.trial.TrialState.FAIL}, done.stdout
    assert "ValueError: x=2 is refused" in done.stdout
    assert done.returncode != 0  # a failed trial fails the command
