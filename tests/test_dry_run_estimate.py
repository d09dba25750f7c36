"""The dry run sizes a sweep: the epochs of the cells that would run, and their time estimated from the
DONE cells of the store with the same model, dataset, image size and device type (proxyattention.sweep.estimate).

The store's DONE cells here are synthetic (a result the store trusts, made by the ``done_cell`` fixture);
the command-line tests plan real cells and stop at the dry run, so nothing trains.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from proxyattention.sweep.plan import Plan, PlannedCell, snapshot_yaml

from launcher import cellstate, fileio
from launcher.local import local_gpu
from launcher.slurm import slurm_gpu
from proxyattention.sweep import estimate
from launcher.manifest import CellRecord

V100 = "Tesla V100-SXM2-32GB"


def config(model: str = "test_resnet", dataset: str = "digits", image_size: int = 32, schedule: str = "1,p,1",
           p_trains: bool = False, device: str = "auto") -> dict:
    return {"dataset": {"name": dataset, "image_size": image_size, "root": None},
            "model": {"name": model, "pretrained": False},
            "proxy": {"enabled": True, "schedule": schedule, "threshold": 0.4, "p_trains": p_trains},
            "train": {"seed": 0, "device": device}}


def result(epochs: int, epoch_parts: tuple[float, float, float], total_s: float, kind: str = "cpu",
           name: str = "x86_64", resumed: int | None = None, **cfg) -> dict:
    """A finished result as the trial writes it: ``epoch_parts`` are train_s, proxy_s and eval_s."""
    train_s, proxy_s, eval_s = epoch_parts
    return {"status": "done", "trial_id": "t", "metrics": {"test/acc": 0.5, "val/acc_best": 0.5},
            "history": [{"epoch": e + 1, "train/loss": 1.0 / (e + 1), "val/acc": 0.5} for e in range(epochs)],
            "proxy_steps": [],
            "timing": {"setup_s": 1.0, "train_s": train_s, "proxy_s": proxy_s, "eval_s": eval_s,
                       "explain_s": 2.0, "total_s": total_s},
            "resumed_from_epoch": resumed, "data": {"name": cfg.get("dataset", "digits")},
            "device": {"type": kind, "name": name, "precision": "fp32"},
            "run": {"device": kind, "epochs": epochs, "batch_size": 64},
            "config": config(**cfg)}


def cid(n: int) -> str:
    return f"{n:012x}"


def plan_of(sweep: Path, configs: list[dict]) -> Plan:
    """A plan of these configs, remembered as the planner remembers its plans; cell ids 0xa0, 0xa1, …"""
    cells = [PlannedCell(CellRecord(id=cid(0xA0 + i), overrides=[]), c) for i, c in enumerate(configs)]
    return estimate.remember_plan(Plan(sweep_dir=sweep, plan_id="p", cells=cells, job_cells=[c.id for c in cells]))


@pytest.fixture(autouse=True)
def _no_remembered_plan(monkeypatch):
    monkeypatch.setattr(estimate, "_PLAN", None)


@pytest.fixture
def store() -> Path:
    return Path(os.environ["PROXYATTENTION_STORE"])


# --- one cell ----------------------------------------------------------------------------------------

def test_a_cell_runs_the_epochs_of_its_schedule_as_the_trial_counts_them():
    assert estimate.cell_epochs(config(schedule="5,p,9,p,9")) == 23
    assert estimate.cell_epochs(config(schedule="5,p,9,p,9", p_trains=True)) == 25  # each p trains an epoch
    assert estimate.cell_epochs(config(schedule="23")) == 23  # its baseline
    assert estimate.cell_epochs(config(schedule="5,3")) == 8


def test_the_device_type_follows_train_device_then_the_gpu_the_backend_gives():
    assert estimate.device_type(config(device="auto"), gpu=True) == "cuda"
    assert estimate.device_type(config(device="auto"), gpu=False) == "cpu"
    assert estimate.device_type(config(device="cpu"), gpu=True) == "cpu"
    assert estimate.device_type(config(device="cuda"), gpu=False) == "cuda"
    assert slurm_gpu("gpu:v100:1", None) == "hydra.launcher.gres=gpu:v100:1"
    assert slurm_gpu(None, 2) == "hydra.launcher.gpus_per_node=2"
    assert slurm_gpu("nvme:1", None) is None and local_gpu([]) is None


# --- the estimate ------------------------------------------------------------------------------------

def test_a_matching_group_is_its_mean_per_epoch_times_its_epochs_and_cells(tmp_path, store, done_cell):
    # Seconds per epoch 10 and 20 (mean 15); once per cell 0 and 4 (mean 2).
    done_cell(store / cid(1), result(2, (16.0, 2.0, 2.0), 20.0))
    done_cell(store / cid(2), result(4, (70.0, 5.0, 5.0), 84.0))
    done_cell(store / cid(3), result(2, (1.0, 0, 0), 1.0, kind="cuda", name=V100))  # another device type
    done_cell(store / cid(4), result(2, (1.0, 0, 0), 1.0, image_size=64))  # another image size
    done_cell(store / cid(5), result(2, (1.0, 0, 0), 1.0, model="resnet18"))  # another model
    sweep = tmp_path / "sweep"
    plan = plan_of(sweep, [config(schedule="5,p,9,p,9")] * 3)

    est = estimate.estimate(sweep, [c.id for c in plan.cells], store, gpu=False)
    (group,) = est.groups
    assert group.key == ("test_resnet", "digits", 32, "cpu") and group.epochs == [23, 23, 23]
    assert len(group.samples) == 2
    assert group.epoch_s == pytest.approx(15.0) and group.cell_s == pytest.approx(2.0)
    assert group.seconds == pytest.approx(15.0 * 23 * 3 + 2.0 * 3)
    assert est.hours("cpu") == pytest.approx(group.seconds / 3600)
    text = estimate.format_estimate(est, None, timeout_min=5)
    assert "test_resnet, digits at 32 px, cpu: 3 cells × 23 epochs = 69 epochs; 15.0 s/epoch + 2.0 s/cell " \
           "from 2 DONE cells (x86_64) → 17.4m" in text, text
    assert "total: 3 cells, 69 epochs; estimate 0.29 CPU-hours (cell wall time) for every cell; " \
           "longest cell ≈ 5.8m (longer than hydra.launcher.timeout_min=5)" in text, text


def test_without_once_per_cell_seconds_the_estimate_is_per_epoch_mean_times_epochs_times_cells(
        tmp_path, store, done_cell):
    done_cell(store / cid(1), result(2, (8.0, 0.0, 0.0), 8.0, kind="cuda", name=V100))  # 4 s an epoch
    done_cell(store / cid(2), result(4, (24.0, 0.0, 0.0), 24.0, kind="cuda", name=V100), compact=True)  # 6
    sweep = tmp_path / "sweep"
    plan = plan_of(sweep, [config(schedule="20,p,19", p_trains=True)] * 2)  # 40 epochs each
    est = estimate.estimate(sweep, [c.id for c in plan.cells], store, gpu=True)
    (group,) = est.groups
    assert group.seconds == pytest.approx(5.0 * 40 * 2)
    text = estimate.format_estimate(est, "GPUs 0 found")
    assert f"test_resnet, digits at 32 px, cuda: 2 cells × 40 epochs = 80 epochs; 5.0 s/epoch + 0.0 s/cell from " \
           f"2 DONE cells ({V100}) → 6.7m" in text, text
    assert "estimate 0.11 GPU-hours (one GPU per cell) for every cell" in text, text


def test_a_resumed_cell_counts_its_epochs_over_attempts_and_its_last_setup_once(tmp_path, store, done_cell):
    # A resumed cell's total_s is its last attempt only; its epoch seconds add up over attempts.
    done_cell(store / cid(1), result(10, (90.0, 5.0, 5.0), 30.0, resumed=6))
    (sample,) = estimate.scan_store(store, tmp_path / "sweep").samples
    assert sample.epoch_s == pytest.approx(10.0) and sample.cell_s == pytest.approx(3.0)  # setup + explain


def test_a_group_with_no_matching_done_cell_says_so(tmp_path, store, done_cell):
    done_cell(store / cid(1), result(2, (4.0, 0, 0), 4.0))
    sweep = tmp_path / "sweep"
    plan = plan_of(sweep, [config(), config(model="resnet18", dataset="cifar100", image_size=224, schedule="7")])
    est = estimate.estimate(sweep, [c.id for c in plan.cells], store, gpu=True)
    assert [g.key for g in est.groups] == [("test_resnet", "digits", 32, "cuda"),
                                           ("resnet18", "cifar100", 224, "cuda")]
    assert all(g.seconds is None for g in est.groups)  # a DONE cell on the CPU says nothing of a GPU
    text = estimate.format_estimate(est, "GPUs 0 found")
    assert "resnet18, cifar100 at 224 px, cuda: 1 cell × 7 epochs: no DONE cell with this model, dataset and " \
           "device to estimate from" in text, text
    assert "total: 2 cells, 9 epochs; no estimate (no cell has a DONE cell to estimate from)" in text, text

    on_cpu = estimate.format_estimate(estimate.estimate(sweep, [c.id for c in plan.cells], store, gpu=False), None)
    assert "test_resnet, digits at 32 px, cpu: 1 cell × 2 epochs; 2.0 s/epoch" in on_cpu, on_cpu
    assert "estimate <0.01 CPU-hours (cell wall time) for the 1 cell with one, 1 cell without" in on_cpu, on_cpu


def test_damaged_and_unusable_entries_are_skipped_and_counted(tmp_path, store, done_cell):
    done_cell(store / cid(1), result(2, (4.0, 0, 0), 4.0))  # the one to estimate from: 2 s an epoch
    bad = done_cell(store / cid(2), result(2, (400.0, 0, 0), 400.0))
    (bad / fileio.RESULT).write_text((bad / fileio.RESULT).read_text()[:40])  # truncated: DAMAGED
    (done_cell(store / cid(3), result(2, (400.0, 0, 0), 400.0)) / cellstate.STATUS).write_text('{"state": "DO')
    gone = done_cell(store / cid(4), result(2, (400.0, 0, 0), 400.0))
    (gone / fileio.RESULT).unlink()  # DONE, its result missing: DAMAGED
    (store / cid(5)).write_text("a file where a cell folder belongs")
    no_config = result(2, (400.0, 0, 0), 400.0)
    no_config["config"] = "not an object"
    done_cell(store / cid(6), no_config)  # DONE and trusted, but nothing to match on
    (store / "not-a-cell").mkdir()
    sweep = tmp_path / "sweep"
    plan = plan_of(sweep, [config()])

    est = estimate.estimate(sweep, [c.id for c in plan.cells], store, gpu=False)
    assert (est.scan.damaged, est.scan.unusable, len(est.scan.samples)) == (3, 1, 1)
    assert est.groups[0].epoch_s == pytest.approx(2.0)
    text = estimate.format_estimate(est, None)
    assert f"({store} holds 1 DONE cell to estimate from; 3 damaged entries skipped; 1 DONE cell without the " \
           "config, device or timing to use):" in text, text


def test_a_result_is_read_from_its_timing_on_unless_laid_out_otherwise(tmp_path, store, done_cell, monkeypatch):
    done_cell(store / cid(1), result(2, (4.0, 0, 0), 4.0))
    done_cell(store / cid(2), result(2, (8.0, 0, 0), 8.0), compact=True)
    whole = []
    read_result = cellstate.read_result
    monkeypatch.setattr(cellstate, "read_result", lambda cell: whole.append(Path(cell).name) or read_result(cell))
    samples = estimate.scan_store(store, tmp_path / "sweep").samples
    assert sorted(s.epoch_s for s in samples) == [2.0, 4.0]
    assert whole == [cid(2)]  # the history of the indented one was never parsed


def test_configs_of_a_recorded_plan_are_read_from_their_snapshots(tmp_path, store, done_cell):
    done_cell(store / cid(1), result(2, (4.0, 0, 0), 4.0))
    sweep = tmp_path / "sweep"
    # The second, a baseline: a schedule of digits alone, a string the snapshot quotes.
    configs = {cid(0xB0): config(schedule="5,p,9,p,9", p_trains=True), cid(0xB1): config(schedule="25")}
    for name, c in configs.items():
        (sweep / "cells" / name).mkdir(parents=True)
        (sweep / "cells" / name / fileio.CONFIG).write_text(snapshot_yaml(c))
    (sweep / "cells" / cid(0xB2)).mkdir()
    (sweep / "cells" / cid(0xB2) / fileio.CONFIG).write_text("model: [unterminated")
    est = estimate.estimate(sweep, [cid(0xB0), cid(0xB1), cid(0xB2)], store, gpu=False)
    assert [(g.key, g.epochs) for g in est.groups] == [(("test_resnet", "digits", 32, "cpu"), [25, 25]),
                                                      (None, [0])]
    text = estimate.format_estimate(est, None)
    assert "1 cell: no config.yaml to read the model, dataset and schedule from; no estimate" in text, text


def test_a_snapshot_reads_as_yaml_reads_it():
    import yaml

    for c in (config(schedule="5,p,9"), config(schedule="25"), config(model="vit_base_patch16_224", device="cuda"),
              config(dataset="yes")):  # a word YAML reads as a boolean: quoted, and read as written
        got = estimate.snapshot_config(snapshot_yaml(c))
        full = yaml.safe_load(snapshot_yaml(c))
        assert got is not None
        for group, keys in got.items():
            assert keys == {k: full[group][k] for k in keys}


# --- the dry run, through the command line --------------------------------------------------------------

def dry_run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the local pool finds no GPU
    proc = subprocess.run([sys.executable, "-m", "launcher", "model=test_resnet", "dataset=digits",
                           "proxy.schedule=1,p,1", "proxy.threshold=0.1,0.4", "hydra.launcher.dry_run=true",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides],
                          cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (tmp_path / "sweep").exists()  # a dry run still writes nothing
    return proc


def test_a_local_dry_run_prints_the_epochs_and_the_estimate(tmp_path, store, done_cell):
    done_cell(store / cid(1), result(2, (20.0, 0, 0), 26.0))  # 10 s an epoch, 6 s once
    done_cell(store / cid(2), result(2, (40.0, 0, 0), 46.0))  # 20 s an epoch, 6 s once
    bad = done_cell(store / cid(3), result(2, (1.0, 0, 0), 1.0))
    (bad / cellstate.STATUS).write_text("{")
    out = dry_run(tmp_path).stdout
    assert f"estimate for the 3 cells that would run ({store} holds 2 DONE cells to estimate from; " \
           "1 damaged entry skipped):" in out, out
    # The two proxy cells and their baseline: 2 epochs each.
    assert "  test_resnet, digits at 32 px, cpu: 3 cells × 2 epochs = 6 epochs; 15.0 s/epoch + 6.0 s/cell from " \
           "2 DONE cells (x86_64) → 108.0s" in out, out
    assert "  total: 3 cells, 6 epochs; estimate 0.03 CPU-hours (cell wall time) for every cell; " \
           "longest cell ≈ 36.0s" in out, out
    assert "cuda when the cells get a GPU, here none, else cpu" in out, out


def test_a_slurm_dry_run_prints_gpu_hours_against_its_time_limit(tmp_path, store, done_cell):
    done_cell(store / cid(1), result(2, (7200.0, 0, 0), 7200.0, kind="cuda", name=V100))  # an hour an epoch
    out = dry_run(tmp_path, "hydra/launcher=slurm", "hydra.launcher.gres=gpu:v100:1",
                  "hydra.launcher.timeout_min=60").stdout
    assert "  test_resnet, digits at 32 px, cuda: 3 cells × 2 epochs = 6 epochs; 3600.0 s/epoch + 0.0 s/cell from " \
           f"1 DONE cell ({V100}) → 6.0h" in out, out
    assert "  total: 3 cells, 6 epochs; estimate 6.00 GPU-hours (one GPU per cell) for every cell; longest cell " \
           "≈ 2.0h (longer than hydra.launcher.timeout_min=60)" in out, out
    assert "cuda when the cells get a GPU, here hydra.launcher.gres=gpu:v100:1, else cpu" in out, out
    assert "dry run: 3 of 3 cells would be submitted" in out, out
