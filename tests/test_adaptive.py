"""Adaptive sweepers (Hydra's Optuna sweeper): trials are cells, each job returns its cell's validation
objective (or fails as a failed trial), re-issuing replays the seeded study from DONE cells, and the
Slurm backend refuses a sweeper that needs results back. Mostly on the torch-free stand-in cell; one
real run of the saved sweep on test_resnet."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fakecell import cells, runs

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="needs pip install -e '.[optuna]' (in [test])")

OPTUNA = ["hydra/sweeper=optuna", "+sweep=optuna_proxy"]


@pytest.mark.floors
def test_trials_are_cells_returning_their_validation_objective(fake):
    proc = fake(*OPTUNA, "hydra.sweeper.n_trials=4", "hydra.sweeper.sampler.n_startup_trials=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = cells(fake.sweep)
    proxies = [c for c in got.values() if c["role"] == "proxy"]
    assert len(proxies) == 4 and all(c["state"] == "DONE" for c in got.values())
    best = yaml.safe_load((fake.sweep / "optimization_results.yaml").read_text())
    # The stand-in's val/acc_best is 0.5 + threshold / 10: what Optuna saw is exactly that.
    thresholds = [float(o.split("=")[1]) for c in proxies for o in c["overrides"] if o.startswith("proxy.threshold=")]
    assert best["best_value"] == pytest.approx(0.5 + max(thresholds) / 10)
    assert best["best_params"]["proxy.threshold"] == pytest.approx(max(thresholds))


def test_reissuing_replays_the_study_and_trains_nothing_and_more_trials_continue_it(fake):
    args = (*OPTUNA, "hydra.sweeper.n_trials=3")
    assert fake(*args).returncode == 0
    first = cells(fake.sweep)
    again = fake(*args)
    assert again.returncode == 0 and "RUNNING" not in again.stdout
    assert cells(fake.sweep).keys() == first.keys() and all(runs(fake.sweep, cid) == 1 for cid in first)
    more = fake(*OPTUNA, "hydra.sweeper.n_trials=5")
    assert more.returncode == 0
    grown = cells(fake.sweep)
    assert first.keys() < grown.keys() and all(runs(fake.sweep, cid) == 1 for cid in grown)
    assert sum(c["role"] == "proxy" for c in grown.values()) == 5


def test_the_gain_over_the_paired_baseline_is_the_objective_on_request(fake):
    proc = fake(*OPTUNA, "hydra.sweeper.n_trials=2", "hydra.launcher.objective_vs_baseline=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    best = yaml.safe_load((fake.sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(best["best_params"]["proxy.threshold"] / 10)  # minus 0.5


def test_a_failed_cell_is_a_failed_trial(fake):
    # Every threshold Optuna could pick fails: the stand-in fails any threshold listed in FAKE_FAIL.
    proc = fake(*OPTUNA, "hydra.sweeper.n_trials=1", "proxy.threshold=0.3", env={"FAKE_FAIL": "0.3"})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "is FAILED" in proc.stderr, proc.stderr[-3000:]


def test_a_dry_run_shows_the_first_batch_only(fake):
    proc = fake(*OPTUNA, "hydra.launcher.dry_run=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "only its first batch is shown" in proc.stdout and not fake.sweep.exists()


def test_slurm_refuses_an_adaptive_sweeper_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launcher", *OPTUNA, "hydra/launcher=slurm", "model=test_resnet",
                           f"hydra.sweep.dir={tmp_path / 's'}"], cwd=tmp_path, text=True, capture_output=True,
                          timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "adaptive sweeper" in proc.stderr and "hydra/launcher=local" in proc.stderr
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_the_saved_optuna_sweep_runs_on_test_resnet_and_reissues_nothing(tmp_path):
    sweep = tmp_path / "optuna"
    args = [sys.executable, "-m", "launcher", *OPTUNA, "model=test_resnet", "hydra.sweeper.n_trials=4",
            "proxy.schedule=1,p,1", "explain.enabled=false", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(args, cwd=tmp_path, text=True, capture_output=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = json.loads(subprocess.run([sys.executable, "-m", "launcher.status", str(sweep), "--json"],
                                       text=True, capture_output=True, check=True).stdout)
    proxies = [c for c in status["cells"] if c["role"] == "proxy"]
    assert len(proxies) == 4
    assert all(c["state"] == "DONE" and isinstance(c["metrics"]["val/acc_best"], float) for c in status["cells"])
    stamps = {c["id"]: (Path(c["dir"]) / "result.json").stat().st_mtime_ns for c in status["cells"]}
    again = subprocess.run(args, cwd=tmp_path, text=True, capture_output=True, timeout=600)
    assert again.returncode == 0 and "RUNNING" not in again.stdout
    assert {c["id"]: (Path(c["dir"]) / "result.json").stat().st_mtime_ns for c in status["cells"]} == stamps
    env_report = dict(os.environ)
    report = subprocess.run([sys.executable, "-m", "proxyattention.report", str(sweep)], cwd=tmp_path, text=True,
                            capture_output=True, env=env_report, timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    assert (sweep / "report" / "figures" / "search.png").is_file()
    assert "## Search" in (sweep / "report" / "report.md").read_text()
