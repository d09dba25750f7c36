"""The local pool with a stand-in cell (no torch; a second each): selection, failures, timeouts,
interrupts, takeovers and concurrent launchers. The real cell is exercised in test_launcher_cells.py.

The stand-in reads its ``config.yaml`` like the real cell, appends one line to ``runs.log`` per run,
and behaves as the environment says: ``FAKE_SLEEP`` seconds, ``FAKE_FAIL`` thresholds that fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fakecell import cells, runs
from waiting import wait_for


def test_sweep_runs_every_cell_once_then_nothing(fake):
    proc = fake("proxy.threshold=0.1,0.4,0.8", "hydra.launcher.workers=2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = cells(fake.sweep)
    assert len(got) == 4 and all(c["state"] == "DONE" for c in got.values())
    assert all(runs(fake.sweep, cid) == 1 for cid in got)
    assert "sweep folder:" in proc.stdout and "test/acc" in proc.stdout
    assert proc.stdout.count("RUNNING ") == 4 and proc.stdout.count("DONE ") >= 4
    line = (fake.sweep / "cells" / next(iter(got)) / "runs.log").read_text().split()
    assert line[1] == str(max(1, len(os.sched_getaffinity(0)) // 2))  # OMP_NUM_THREADS = cores // workers

    again = fake("proxy.threshold=0.1,0.4,0.8", "hydra.launcher.workers=2")
    assert again.returncode == 0
    assert "All 4 cells are DONE; nothing to run." in again.stdout
    assert all(runs(fake.sweep, cid) == 1 for cid in got)


def test_failed_cell_does_not_stop_the_sweep_and_reruns_alone(fake):
    proc = fake("proxy.threshold=0.1,0.4", env={"FAKE_FAIL": "0.4"})
    assert proc.returncode == 1
    got = cells(fake.sweep)
    states = sorted(c["state"] for c in got.values())
    assert states == ["DONE", "DONE", "FAILED"]
    bad = next(c for c in got.values() if c["state"] == "FAILED")
    assert "FileNotFoundError: no data for 0.4" in bad["error"]
    assert "FileNotFoundError" in proc.stdout  # the state-change line carries the error

    # With a new cell in the grid (PENDING), rerun=failed runs the FAILED cell only.
    plan_more = fake("proxy.threshold=0.1,0.4,0.8", "hydra.launcher.rerun=failed")
    after = cells(fake.sweep)
    assert after[bad["id"]]["state"] == "DONE" and after[bad["id"]]["attempts"] == 2
    assert sorted(c["state"] for c in after.values()) == ["DONE", "DONE", "DONE", "PENDING"]
    assert plan_more.returncode == 1  # not everything is DONE
    assert all(runs(fake.sweep, cid) == (0 if c["state"] == "PENDING" else 1)
               for cid, c in after.items() if cid != bad["id"])


def test_force_reruns_everything_and_keeps_the_old_results(fake):
    fake("proxy.threshold=0.1")
    proc = fake("proxy.threshold=0.1", "hydra.launcher.rerun=all")
    assert proc.returncode == 0
    for cid, c in cells(fake.sweep).items():
        assert c["state"] == "DONE" and c["attempts"] == 2
        previous = list((fake.sweep / "cells" / cid / "previous").glob("*/result.json"))
        assert len(previous) == 1


def test_dry_run_lists_what_would_run(fake):
    fake("proxy.threshold=0.1")
    proc = fake("proxy.threshold=0.1,0.4", "hydra.launcher.dry_run=true")
    assert proc.returncode == 0
    assert "dry run: 1 of 3 cells would run" in proc.stdout
    assert sum(runs(fake.sweep, cid) for cid in cells(fake.sweep)) == 2


def test_timeout_kills_the_process_group(fake):
    t0 = time.time()
    proc = fake("proxy=none", "proxy.schedule=2", "hydra.launcher.timeout_min=0.03",
                env={"FAKE_SLEEP": "120", "FAKE_GRANDCHILD": "1"})
    assert time.time() - t0 < 60
    assert proc.returncode == 1
    (c,) = cells(fake.sweep).values()
    assert c["state"] == "TIMEOUT"
    grandchild = int((Path(c["dir"]) / "grandchild.pid").read_text())
    wait_for(lambda: not Path(f"/proc/{grandchild}").exists() or
             Path(f"/proc/{grandchild}/stat").read_text().split(")")[1].split()[0] == "Z", timeout=10)


def test_ctrl_c_stops_cells_and_marks_them_rerunnable(fake):
    proc = fake("proxy=none", "proxy.schedule=2", env={"FAKE_SLEEP": "120"}, background=True)
    status = wait_for(lambda: next(iter(fake.sweep.glob("cells/*/status.json")), None))
    cell = status.parent
    wait_for(lambda: (cell / "runs.log").exists())  # the stand-in is running
    child = json.loads(status.read_text())["pid"]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, out + err
    (c,) = cells(fake.sweep).values()
    assert c["state"] == "CANCELLED" and c["interrupted"]
    assert not _alive(child)
    rerun = fake("proxy=none", "proxy.schedule=2")
    assert rerun.returncode == 0 and runs(fake.sweep, cell.name) == 2


def test_killed_launcher_leaves_a_claim_that_is_taken_over(fake):
    proc = fake("proxy=none", "proxy.schedule=2", env={"FAKE_SLEEP": "120"}, background=True)
    status = wait_for(lambda: next(iter(fake.sweep.glob("cells/*/status.json")), None))
    wait_for(lambda: (status.parent / "runs.log").exists())
    orphan = json.loads(status.read_text())["pid"]
    proc.kill()  # kill -9: its cell lives on, unsupervised
    proc.communicate()
    assert _alive(orphan)
    (c,) = cells(fake.sweep).values()
    # RUNNING with a dead launcher, its cell process alive: still running, orphaned (not CANCELLED)
    assert c["state"] == "RUNNING" and not c["interrupted"] and c["error"].startswith("orphaned")
    rerun = fake("proxy=none", "proxy.schedule=2")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert not _alive(orphan)  # stopped before the rerun, so one process works in the folder
    (c,) = cells(fake.sweep).values()
    assert c["state"] == "DONE" and c["attempts"] == 2


def test_cell_killed_by_a_signal_is_cancelled_and_rerun(fake):
    proc = fake("proxy=none", "proxy.schedule=2", env={"FAKE_SLEEP": "120"}, background=True)
    status = wait_for(lambda: next(iter(fake.sweep.glob("cells/*/status.json")), None))
    wait_for(lambda: (status.parent / "runs.log").exists())
    child = json.loads(status.read_text())["pid"]
    os.kill(child, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    (c,) = cells(fake.sweep).values()
    assert c["state"] == "CANCELLED" and "SIGKILL" in c["error"]
    assert fake("proxy=none", "proxy.schedule=2").returncode == 0


def test_two_launchers_at_once_run_each_cell_once(fake):
    args = ("proxy.threshold=0.1,0.2,0.4,0.8,0.95", "hydra.launcher.workers=2")
    a = fake(*args, env={"FAKE_SLEEP": "1"}, background=True)
    b = fake(*args, env={"FAKE_SLEEP": "1"}, background=True)
    out_a, err_a = a.communicate(timeout=240)
    out_b, err_b = b.communicate(timeout=240)
    assert a.returncode == 0, out_a + err_a
    assert b.returncode == 0, out_b + err_b
    got = cells(fake.sweep)
    assert len(got) == 6
    assert all(c["state"] == "DONE" and c["attempts"] == 1 for c in got.values())
    assert all(runs(fake.sweep, cid) == 1 for cid in got)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_done_cell_is_reused_by_another_folder_and_command(fake, tmp_path):
    """Planned again from another sweep folder, with a harmless override and one more threshold, only
    the new cell trains; the reused ones show as DONE with their attempts unchanged."""
    first = fake("proxy.threshold=0.1,0.4")
    assert first.returncode == 0, first.stdout + first.stderr
    done = cells(fake.sweep)
    assert len(done) == 3 and all(c["state"] == "DONE" for c in done.values())
    other = tmp_path / "elsewhere"
    again = fake("proxy.threshold=0.1,0.4,0.85", "train.num_threads=1", sweep_dir=other)
    assert again.returncode == 0, again.stdout + again.stderr
    now = cells(other)
    assert len(now) == 4 and all(c["state"] == "DONE" for c in now.values())
    new = set(now) - set(done)
    assert len(new) == 1 and runs(other, new.pop()) == 1
    for cid, c in done.items():
        assert runs(other, cid) == 1 and now[cid]["attempts"] == c["attempts"] == 1  # not trained again
    store = Path(os.environ["PROXYATTENTION_STORE"])
    assert (other / "cells" / cid).resolve() == (store / cid).resolve()


def test_cells_stay_in_the_sweep_folder_without_a_store(fake):
    proc = fake("proxy.threshold=0.1", "hydra.launcher.store=null")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for d in (fake.sweep / "cells").iterdir():
        assert d.is_dir() and not d.is_symlink()


def test_every_entry_point_exits_non_zero_when_a_cell_fails_even_in_batches(fake, tmp_path):
    """With hydra.sweeper.max_batch_size=1 the failed cell's batch comes first and a DONE one last:
    every batch still runs, and the command fails (python -m launcher and python -m proxyattention.train -m)."""
    proc = fake("proxy.threshold=0.1,0.4", "hydra.sweeper.max_batch_size=1", env={"FAKE_FAIL": "0.1"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    states = sorted(c["state"] for c in cells(fake.sweep).values())
    assert states == ["DONE", "DONE", "FAILED"]  # the batches after the failure ran
    assert "not every cell of this sweep is DONE" in proc.stderr
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "fakecell"), FAKE_FAIL="0.85")
    train = subprocess.run([sys.executable, "-m", "proxyattention.train", "-m", "model=test_resnet",
                            "proxy.threshold=0.85", f"hydra.sweep.dir={tmp_path / 'via_train'}",
                            "hydra.launcher.cell_module=fake_cell", "hydra.launcher.gpus=''"],
                           cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
    assert train.returncode != 0, train.stdout + train.stderr
    ok = fake("proxy.threshold=0.4")  # all DONE: exit 0
    assert ok.returncode == 0, ok.stdout + ok.stderr
