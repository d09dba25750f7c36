"""Per-epoch progress of a running cell (``progress.json``) and pruning (``prune.json`` → PRUNED).

A real tiny trial (digits, test_resnet) writes its progress after every epoch and stops at the next epoch
boundary once asked to; the launcher records it PRUNED, a re-issue and ``rerun=failed`` leave it, and
``rerun=all`` redoes it. ``launcher.status`` and the local console show a running cell's epoch, last
validation accuracy and time left; the report lists a PRUNED cell and never counts its partial result.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakecell import cells, runs
from omegaconf import OmegaConf
from waiting import wait_for

from launcher import cellstate, fileio, manifest, progress
from launcher.cellstate import CellState, CellStatus, Owner
from launcher.console import Console
from launcher.manifest import CellRecord, Rerun

REPO = Path(__file__).resolve().parents[1]
FAST = ("dataset=digits", "model=test_resnet", "explain.enabled=false")


def tiny_cfg(tmp_path: Path, schedule: str = "3"):
    from proxyattention.config import TrialConfig

    cfg = OmegaConf.structured(TrialConfig)
    cfg.model.name = "test_resnet"
    cfg.dataset.cache_dir = str(tmp_path / "cache")
    cfg.proxy.schedule = schedule
    cfg.proxy.enabled = False
    cfg.train.progress = False
    cfg.explain.enabled = False
    return cfg


def pruned_result(epoch: int, epochs: int, reason: str = "below the median", **metrics) -> dict:
    """The partial result.json a pruned trial leaves (as proxyattention.train.write_pruned writes it)."""
    return {"status": "pruned", "metrics": {"val/acc": 0.3, "val/acc_best": 0.3, **metrics},
            "history": [{"epoch": e, "val/acc": 0.3} for e in range(1, epoch + 1)],
            "timing": {"total_s": 1.0}, "run": {"epochs": epochs},
            "pruned": {"epoch": epoch, "epochs": epochs, "reason": reason, "requested": time.time()}}


def make_pruned(cell: Path, epoch: int = 1, epochs: int = 2, **metrics) -> None:
    """Turn a cell into one that ended PRUNED, as the launcher leaves it (request, partial result, status)."""
    progress.request_prune(cell, "below the median")
    fileio.write_json_atomic(cell / fileio.RESULT, pruned_result(epoch, epochs, **metrics))
    state, error, m = manifest.cell_outcome(cell, 0)
    assert state == CellState.PRUNED
    attempts = max(1, cellstate.read_status(cell).attempts)  # the attempt that was pruned
    start = CellStatus(attempts=attempts - 1).started_by(Owner.this_process(), pid=1)
    cellstate.write_status(cell, start.finished(state, exit_code=0, error=error, metrics=m))


# ------------------------------------------------------------------------------------------ progress.json

def test_a_trial_writes_its_progress_after_every_epoch(tmp_path, monkeypatch):
    from proxyattention import train as train_mod

    seen: list[dict] = []
    write = progress.write_progress

    def spy(cell, **kw):  # what a reader finds on disk after each write
        out = write(cell, **kw)
        seen.append(progress.read_progress(cell))
        return out

    monkeypatch.setattr(progress, "write_progress", spy)
    out = tmp_path / "trial"
    result = train_mod.train(tiny_cfg(tmp_path, "3"), out)
    assert result["status"] == "done"
    assert [p["epoch"] for p in seen] == [0, 1, 2, 3]  # at the start, then after every epoch
    assert all(p["epochs"] == 3 for p in seen)
    assert [len(p["history"]) for p in seen] == [0, 1, 2, 3]
    assert [len(p["epoch_s"]) for p in seen] == [0, 1, 2, 3] and all(s > 0 for s in seen[-1]["epoch_s"])
    final = progress.read_progress(out)
    assert final == seen[-1]
    accs = [h["val/acc"] for h in result["history"]]
    assert [h["val/acc"] for h in final["history"]] == pytest.approx(accs)
    assert [h["val/acc_best"] for h in final["history"]] == pytest.approx(
        [max(accs[: i + 1]) for i in range(len(accs))])
    assert progress.metric_by_epoch(final, "val/acc_best")[3] == pytest.approx(result["metrics"]["val/acc_best"])
    assert (out / progress.PROGRESS).stat().st_size < 4096  # small: no per-image data
    assert not list(out.glob(".progress.json.*"))  # written atomically: no temp file left


def test_read_progress_is_tolerant_of_damaged_files(tmp_path):
    assert progress.read_progress(tmp_path) is None  # none yet
    good = progress.write_progress(tmp_path, epoch=2, epochs=5, history=[{"epoch": 1, "val/acc": 0.5},
                                                                         {"epoch": 2, "val/acc": 0.4}],
                                   epoch_s=[10.0, 12.0], started=time.time() - 30)
    assert progress.read_progress(tmp_path) == json.loads((tmp_path / "progress.json").read_text()) == good
    assert progress.metric_by_epoch(good, "val/acc_best") == {1: 0.5, 2: 0.5}
    assert progress.eta_s(good, now=good["updated"]) == pytest.approx(33.0)  # mean 11 s × 3 epochs left
    assert progress.eta_s(good, now=good["updated"] + 5) == pytest.approx(28.0)
    text = (tmp_path / "progress.json").read_text()
    for bad in (text[: len(text) // 2], "[]", "null", json.dumps({**good, "epoch": 6}),
                json.dumps({**good, "epochs": 0}), json.dumps({**good, "epoch": "2"}),
                json.dumps({**good, "history": {"epoch": 1}}), json.dumps({**good, "epoch_s": ["x"]})):
        (tmp_path / "progress.json").write_text(bad)
        assert progress.read_progress(tmp_path) is None, bad


def running_cell(sweep: Path, cid: str, with_progress: bool = True) -> Path:
    """A cell RUNNING under this (live) process, as a launcher leaves it mid-run."""
    cell = cellstate.cell_dir(sweep, cid)
    cell.mkdir(parents=True)
    cellstate.write_status(cell, CellStatus().started_by(Owner.this_process(), pid=os.getpid()))
    if with_progress:
        progress.write_progress(cell, epoch=2, epochs=5, history=[{"epoch": 1, "val/acc": 0.7},
                                                                  {"epoch": 2, "val/acc": 0.8125}],
                                epoch_s=[10.0, 12.0], started=time.time() - 25)
    return cell


def test_status_shows_a_running_cells_epoch_accuracy_and_time_left(tmp_path, run_module):
    sweep = tmp_path / "sweep"
    running_cell(sweep, "aaaaaaaaaaaa")
    running_cell(sweep, "bbbbbbbbbbbb", with_progress=False)  # still setting up: no progress yet
    done = cellstate.cell_dir(sweep, "cccccccccccc")
    done.mkdir(parents=True)
    fileio.write_json_atomic(done / fileio.RESULT, {"status": "done", "metrics": {"test/acc": 0.9}})
    cellstate.write_status(done, CellStatus().started_by(Owner.this_process(), pid=1).finished(
        CellState.DONE, exit_code=0, metrics={"test/acc": 0.9}, result_size=cellstate.result_size(done)))

    text = run_module("launcher.status", str(sweep), cwd=tmp_path, check=True).stdout
    row = next(ln for ln in text.splitlines() if ln.startswith("aaaaaaaaaaaa"))
    assert "RUNNING" in row and "epoch 2/5" in row and "val/acc 0.8125" in row
    left = re.search(r"~(\d+)s of training left", row)
    assert left and 25 <= int(left.group(1)) <= 33, row  # 11 s × 3 epochs, less the time since epoch 2 ended
    assert "progress" in text.splitlines()[0]

    out = json.loads(run_module("launcher.status", str(sweep), "--json", cwd=tmp_path, check=True).stdout)
    got = {c["id"]: c for c in out["cells"]}
    p = got["aaaaaaaaaaaa"]["progress"]
    assert (p["epoch"], p["epochs"], p["val/acc"], p["epoch_s"]) == (2, 5, 0.8125, 11.0)
    assert 25 <= p["eta_s"] <= 33
    assert got["bbbbbbbbbbbb"]["progress"] is None  # RUNNING, no record yet
    assert "progress" not in got["cccccccccccc"]  # only running cells carry one


def test_the_console_shows_each_new_epoch_of_a_running_cell_once(tmp_path):
    shown = io.StringIO()
    console = Console([CellRecord(id="aaaaaaaaaaaa", overrides=["proxy.threshold=0.4"])], stream=shown)
    cell = running_cell(tmp_path / "sweep", "aaaaaaaaaaaa")
    console.progress("aaaaaaaaaaaa", progress.read_progress(cell))
    console.progress("aaaaaaaaaaaa", progress.read_progress(cell))  # the same epoch again: no new line
    console.progress("aaaaaaaaaaaa", None)
    lines = shown.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("RUNNING") and "epoch 2/5" in lines[0] and "val/acc 0.8125" in lines[0]
    assert re.search(r"~\d+s of training left", lines[0])


# ------------------------------------------------------------------------------------------ pruning

def launcher(tmp_path: Path, *overrides: str, stdout=subprocess.PIPE, background: bool = False):
    args = [sys.executable, "-m", "launcher", *FAST, *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}",
            "hydra.launcher.heartbeat_s=0.5"]
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if background:
        return subprocess.Popen(args, cwd=tmp_path, env=env, text=True, stdout=stdout, stderr=subprocess.STDOUT)
    return subprocess.run(args, cwd=tmp_path, env=env, text=True, capture_output=True, timeout=600)


@pytest.mark.slow
def test_a_prune_request_stops_a_real_cell_at_the_next_epoch_boundary(tmp_path, run_module):
    args = ("proxy=none", "proxy.schedule=40")  # ~40 epochs unless pruned
    log = tmp_path / "launcher.log"
    with open(log, "w") as out:
        proc = launcher(tmp_path, *args, stdout=out, background=True)
        try:
            status = wait_for(lambda: next(iter((tmp_path / "sweep").glob("cells/*/status.json")), None))
            cell = status.parent
            # The console's progress line for this cell (at a heartbeat, once an epoch is done).
            wait_for(lambda: re.search(r"RUNNING .*epoch \d+/40  val/acc \d\.\d{4}", log.read_text()),
                     what="a progress line on the console")
            seen = progress.read_progress(cell)
            assert seen is not None and seen["epoch"] >= 1 and seen["epochs"] == 40
            progress.request_prune(cell, "below the median of the other trials")
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=60)
    text = log.read_text()
    assert proc.returncode == 0, text  # a pruned cell is no failure
    (c,) = cells(tmp_path / "sweep").values()
    assert c["state"] == "PRUNED" and c["attempts"] == 1, c
    result = json.loads((cell / "result.json").read_text())
    pruned = result["pruned"]
    assert result["status"] == "pruned" and pruned["reason"] == "below the median of the other trials"
    assert seen["epoch"] <= pruned["epoch"] <= seen["epoch"] + 2 < 40  # stopped at an epoch boundary soon after
    assert pruned["epochs"] == 40 and c["metrics"]["pruned/epoch"] == pruned["epoch"]
    assert [h["epoch"] for h in result["history"]] == list(range(1, pruned["epoch"] + 1))
    assert "test/acc" not in result["metrics"] and "val/acc_best" in result["metrics"]
    assert cellstate.read_result(cell) is None  # never a finished result
    assert progress.read_progress(cell)["epoch"] == pruned["epoch"]
    assert c["error"].startswith(f"pruned after epoch {pruned['epoch']} of 40")
    assert "PRUNED" in text  # the state-change line and the summary

    status_text = run_module("launcher.status", str(tmp_path / "sweep"), cwd=tmp_path, check=True).stdout
    assert "PRUNED" in status_text and "1 PRUNED" in status_text
    assert f"pruned after epoch {pruned['epoch']} of 40: below the median" in status_text

    for extra in ((), ("hydra.launcher.rerun=failed",)):  # neither a re-issue nor rerun=failed reruns it
        again = launcher(tmp_path, *args, *extra)
        assert again.returncode == 0, again.stdout + again.stderr
        assert (cell / "stdout.log").read_text().count("===== attempt ") == 1
    (c,) = cells(tmp_path / "sweep").values()
    assert c["state"] == "PRUNED" and c["attempts"] == 1


def test_a_pruned_cell_is_kept_by_reissue_and_rerun_failed_and_redone_by_rerun_all(fake):
    assert fake("proxy.threshold=0.4").returncode == 0
    got = cells(fake.sweep)
    cid = next(i for i, c in got.items() if c["role"] == "proxy")
    cell = fake.sweep / "cells" / cid
    make_pruned(cell)
    assert cells(fake.sweep)[cid]["state"] == "PRUNED"

    again = fake("proxy.threshold=0.4")
    assert again.returncode == 0, again.stdout + again.stderr  # PRUNED is not a failure
    assert "All 2 cells are finished (1 DONE, 1 PRUNED); nothing to run." in again.stdout
    assert "PRUNED" in again.stdout  # the summary table
    failed = fake("proxy.threshold=0.4", "hydra.launcher.rerun=failed")
    assert failed.returncode == 0 and runs(fake.sweep, cid) == 1
    assert cells(fake.sweep)[cid]["state"] == "PRUNED"

    forced = fake("proxy.threshold=0.4", "hydra.launcher.rerun=all")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert runs(fake.sweep, cid) == 1  # ran again, in a fresh log (the first one went aside)
    c = cells(fake.sweep)[cid]
    assert c["state"] == "DONE" and c["attempts"] == 2
    assert not (cell / progress.PRUNE).exists()  # the request went aside with the partial result
    (aside,) = (cell / "previous").glob("*/")
    assert (aside / progress.PRUNE).exists() and json.loads((aside / "result.json").read_text())["status"] == "pruned"


def test_rerun_modes_and_the_pruned_state():
    assert CellState.PRUNED.finished and not CellState.PRUNED.failed and CellState.PRUNED.settled
    assert not Rerun.NOT_DONE.wants(CellState.PRUNED) and not Rerun.FAILED.wants(CellState.PRUNED)
    assert not Rerun.DAMAGED.wants(CellState.PRUNED) and Rerun.ALL.wants(CellState.PRUNED)
    assert Rerun.NOT_DONE.wants(CellState.CANCELLED) and not Rerun.NOT_DONE.wants(CellState.DONE)


def test_a_pruned_result_nobody_recorded_is_adopted_as_pruned(tmp_path):
    cell = tmp_path / "cell"
    cell.mkdir()
    fileio.write_json_atomic(cell / fileio.RESULT, pruned_result(2, 4))
    status = cellstate.read_status(cell)
    assert status.state == CellState.PENDING  # not DAMAGED: a pruned result is a legitimate end
    assert manifest.adoptable(cell)
    adopted = manifest.adopted(cell, status)
    assert adopted.state == CellState.PRUNED and adopted.error == "pruned after epoch 2 of 4: below the median"
    (cell / fileio.RESULT).write_text(json.dumps({**pruned_result(2, 4), "pruned": "yes"}))
    assert not manifest.adoptable(cell) and cellstate.read_status(cell).state == CellState.DAMAGED


PRUNED_CELL = r'''
import json, os, sys, time
cell = sys.argv[1]
json.dump({"status": "pruned", "metrics": {"val/acc_best": 0.5}, "history": [{"epoch": 1, "val/acc": 0.5}],
           "pruned": {"epoch": 1, "epochs": 3, "reason": "threshold", "requested": time.time()}},
          open(os.path.join(cell, "result.json"), "w"))
'''


def test_a_slurm_job_whose_cell_is_pruned_ends_without_failing(tmp_path, monkeypatch):
    """What a Slurm array task runs, here in this process: a pruned cell is PRUNED, and the job does not
    raise (Slurm would otherwise record it FAILED)."""
    from launcher.slurm_job import CellJob

    (tmp_path / "prunedcell.py").write_text(PRUNED_CELL)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    cell = tmp_path / "cell"
    cell.mkdir()
    usr2 = signal.getsignal(signal.SIGUSR2)
    try:
        out = CellJob(cell_dir=str(cell), cell_module="prunedcell", heartbeat_s=0.2)()
        assert out["state"] == "PRUNED"
        s = cellstate.read_status(cell)
        assert s.state == CellState.PRUNED and s.error == "pruned after epoch 1 of 3: threshold"
        again = CellJob(cell_dir=str(cell), cell_module="prunedcell", heartbeat_s=0.2)()
        assert again == {"state": "PRUNED", "skipped": True} and cellstate.read_status(cell).attempts == 1
    finally:
        signal.signal(signal.SIGUSR2, usr2)


# ------------------------------------------------------------------------------------------ the report

def trial(seed: int, proxy: bool = True):
    from proxyattention.config import TrialConfig
    from proxyattention.identity import baseline_of

    cfg = OmegaConf.structured(TrialConfig)
    cfg.model.name = "test_resnet"
    cfg.train.seed = seed
    cfg.proxy.schedule = "1,p,1"
    cfg.proxy.threshold = 0.4
    cfg.dataset.cache_dir = "/tmp/unused"
    return cfg if proxy else baseline_of(cfg)


def done_cell_of(sweep: Path, cfg, acc: float) -> Path:
    from proxyattention.identity import cell_id

    d = sweep / "cells" / cell_id(cfg)
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    fileio.write_json_atomic(d / fileio.RESULT, {
        "status": "done", "metrics": {"test/acc": acc, "val/acc_best": acc}, "timing": {"total_s": 1.0},
        "history": [], "run": {"target_layer": "layer2", "epochs": 2}, "data": {"split": "x"}})
    cellstate.write_status(d, CellStatus().started_by(Owner.this_process(), pid=1).finished(
        CellState.DONE, exit_code=0, metrics={"test/acc": acc}, result_size=cellstate.result_size(d)))
    return d


def test_the_report_lists_a_pruned_cell_and_never_counts_its_partial_result(tmp_path):
    from proxyattention.analysis import stats, table
    from proxyattention.analysis.report import ReportConfig, build_report

    sweep = tmp_path / "sweep"
    for seed, (p, b) in enumerate([(0.80, 0.78), (0.82, 0.81), (0.84, 0.80), (0.99, 0.79)]):
        done_cell_of(sweep, trial(seed, proxy=False), b)
        d = done_cell_of(sweep, trial(seed), p)
    # Seed 3's proxy cell was pruned; its partial result even carries numbers a careless reader would use.
    make_pruned(d, epoch=1, epochs=2, **{"test/acc": 0.99})
    df = table.load_results(sweep)
    row = df[df["cell_id"] == d.name].iloc[0]
    assert row["state"] == "PRUNED" and row["pruned_epoch"] == 1
    assert math.isnan(row["test/acc"]) and math.isnan(row["val/acc_best"])
    assert row["error"].startswith("pruned after epoch 1 of 2")
    (summary,) = stats.paired_summary(df).to_dict("records")
    assert summary["paired"] == 3  # seeds 0-2 only
    assert summary["diff_mean"] == pytest.approx((0.02 + 0.01 + 0.04) / 3)

    md = build_report(sweep, ReportConfig(maps=0)).read_text()
    assert "**8 cells:** 7 DONE, 1 PRUNED." in md
    not_done = md.split("## Cells not done", 1)[1].split("\n## ", 1)[0]
    assert d.name in not_done and "| PRUNED |" in not_done and "pruned after epoch 1 of 2" in not_done
    assert "partial results are left out" in not_done
    assert "## Problems" not in md  # pruned is not a problem
    csv = (sweep / "report" / "results.csv").read_text().splitlines()
    (line,) = [ln for ln in csv if ln.startswith(d.name)]
    assert ",PRUNED," in line and "0.99" not in line


class Clock:
    """time.time and time.sleep for await_judgement: sleeping advances the clock; ``on_sleep`` may act."""

    def __init__(self, on_sleep=None):
        self.now, self.slept, self.on_sleep = 1000.0, 0.0, on_sleep

    def time(self):
        return self.now

    def sleep(self, s):
        self.now += s
        self.slept += s
        if self.on_sleep:
            self.on_sleep(self)


def _judged(cell, epoch, updated, poll_s=1.0):
    (cell / progress.JUDGED).write_text(json.dumps({"epoch": epoch, "updated": updated, "poll_s": poll_s}))


def test_a_cell_no_monitor_watches_never_waits(tmp_path):
    clock = Clock()
    assert progress.await_judgement(tmp_path, 1, clock=clock.time, sleep=clock.sleep) is False
    _judged(tmp_path, 0, updated=clock.now - 10)  # a gone monitor's mark: older than 3 polls
    assert progress.await_judgement(tmp_path, 1, clock=clock.time, sleep=clock.sleep) is False
    (tmp_path / progress.JUDGED).write_text("{not json")
    assert progress.await_judgement(tmp_path, 1, clock=clock.time, sleep=clock.sleep) is False
    assert clock.slept == 0


def test_a_watched_cell_waits_for_the_verdict_on_its_epoch(tmp_path):
    def monitor_judges_epoch_2_later(clock):
        _judged(tmp_path, 1 if clock.slept < 0.5 else 2, updated=clock.now)

    clock = Clock(monitor_judges_epoch_2_later)
    _judged(tmp_path, 1, updated=clock.now)
    assert progress.await_judgement(tmp_path, 2, clock=clock.time, sleep=clock.sleep) is True
    assert 0.5 <= clock.slept < 1.0
    assert progress.await_judgement(tmp_path, 2, clock=clock.time, sleep=clock.sleep) is True  # judged: no wait
    assert clock.slept < 1.0


def test_a_prune_request_ends_the_wait_and_a_stalled_monitor_is_waited_for_three_polls_at_most(tmp_path):
    clock = Clock(lambda c: progress.request_prune(tmp_path, "below") if c.slept >= 0.3 else None)
    _judged(tmp_path, 1, updated=clock.now)
    assert progress.await_judgement(tmp_path, 2, clock=clock.time, sleep=clock.sleep) is True
    (tmp_path / progress.PRUNE).unlink()
    stalled = Clock(lambda c: _judged(tmp_path, 1, updated=c.now))  # rewritten, never judging epoch 2
    _judged(tmp_path, 1, updated=stalled.now)
    assert progress.await_judgement(tmp_path, 2, clock=stalled.time, sleep=stalled.sleep) is False
    assert 3.0 <= stalled.slept <= 3.5


def test_the_monitor_marks_its_cells_judged_only_with_a_pruner_and_takes_the_marks_away(tmp_path):
    import optuna

    from launcher.optuna_sweeper import CellProgress, PruneMonitor, Watched

    cell = tmp_path / "c"
    cell.mkdir()
    progress.write_progress(cell, epoch=1, epochs=3, history=[{"epoch": 1, "val/acc": 0.7}], epoch_s=[1.0],
                            started=0.0)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    without = PruneMonitor(CellProgress(), "val/acc", prune=False, say=lambda line: None)
    without.watch([Watched(study.ask(), cell)])
    without.poll()
    assert not (cell / progress.JUDGED).exists()
    monitor = PruneMonitor(CellProgress(), "val/acc", prune=True, poll_s=10.0, say=lambda line: None)
    assert monitor.poll_s == 0.25  # a cell waits for its verdict: polled often
    monitor.watch([Watched(study.ask(), cell)])
    monitor.poll()
    judged = json.loads((cell / progress.JUDGED).read_text())
    assert judged["epoch"] == 1 and judged["poll_s"] == 1.0
    assert progress.await_judgement(cell, 1) is True  # epoch 1 is judged: the cell goes on at once
    monitor.stop()
    assert not (cell / progress.JUDGED).exists()
