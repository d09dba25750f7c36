"""The sweep folder protocol: states, atomic status files, exclusive claims, outcomes of an attempt."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher import cellstate, manifest
from launcher.cellstate import CellState, CellStatus, Owner
from launcher.manifest import CellRecord


def _claim_in_child(cell: str, barrier, results) -> None:
    barrier.wait()
    claim = manifest.try_claim(Path(cell))
    results.put(None if claim is None else claim.generation)


def test_status_round_trip_and_pending_default(tmp_path):
    cell = tmp_path / "c"
    cell.mkdir()
    assert cellstate.read_status(cell).state is CellState.PENDING
    s = CellStatus().started_by(Owner.this_process(), pid=123)
    cellstate.write_status(cell, s)
    back = cellstate.read_status(cell)
    assert back.state is CellState.RUNNING and back.attempts == 1 and back.pid == 123
    assert json.loads((cell / "status.json").read_text())["state"] == "RUNNING"
    assert not [p for p in cell.iterdir() if p.name.endswith(".tmp")]  # temp file renamed away


def test_many_processes_claiming_at_once_one_wins(tmp_path):
    cell = tmp_path / "c"
    ctx = mp.get_context("spawn")
    n = 6
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_claim_in_child, args=(str(cell), barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    got = [results.get(timeout=5) for _ in range(n)]
    # Every child has exited: their claims are stale now, but exactly one was granted.
    assert sum(g is not None for g in got) == 1


def test_live_claim_blocks_and_dead_owner_is_taken_over(tmp_path):
    cell = tmp_path / "c"
    mine = manifest.try_claim(cell)
    assert mine is not None
    assert manifest.try_claim(cell) is None  # held by this live process
    assert manifest.claim_holder(cell).pid == os.getpid()
    mine.release()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    ghost = Owner.this_process()
    ghost.pid, ghost.start = int(dead), None
    assert manifest.try_claim(cell, owner=ghost).generation == 1
    assert manifest.claim_holder(cell) is None  # its owner is gone
    taken = manifest.try_claim(cell)
    assert taken is not None and taken.generation == 2
    assert sorted(p.name for p in cell.iterdir() if p.name.startswith("claim.")) == ["claim.2"]


def test_claim_from_another_host_goes_stale_by_heartbeat(tmp_path):
    cell = tmp_path / "c"
    other = Owner(host="elsewhere", pid=1, start=None, token="t")
    claim = manifest.try_claim(cell, owner=other)
    assert manifest.try_claim(cell, stale_after_s=60) is None
    old = claim.path.stat().st_mtime - 120
    os.utime(claim.path, (old, old))
    assert manifest.try_claim(cell, stale_after_s=60) is not None


def test_running_with_dead_launcher_reads_as_interrupted():
    s = CellStatus().started_by(Owner.this_process(), pid=1)
    assert cellstate.effective_status(s).state is CellState.RUNNING
    s.owner_pid = 2 ** 22 + 12345  # no such pid
    eff = cellstate.effective_status(s)
    assert eff.state is CellState.CANCELLED and eff.interrupted and eff.state.failed


def test_outcome_done_needs_a_parsed_result(tmp_path):
    cell = tmp_path / "c"
    cell.mkdir()
    state, err, _ = manifest.cell_outcome(cell, 0)
    assert state is CellState.FAILED and "result.json" in err
    (cell / "result.json").write_text('{"status": "done", "metr')  # torn
    assert manifest.cell_outcome(cell, 0)[0] is CellState.FAILED
    (cell / "result.json").write_text(json.dumps({"status": "done", "metrics": {"test/acc": 0.5},
                                                  "timing": {"train_s": 1.0}}))
    state, err, metrics = manifest.cell_outcome(cell, 0)
    assert state is CellState.DONE and err is None and metrics["test/acc"] == 0.5


def test_outcome_failed_carries_the_error_tail(tmp_path):
    cell = tmp_path / "c"
    cell.mkdir()
    (cell / "error.json").write_text(json.dumps({"status": "failed", "type": "FileNotFoundError",
                                                 "error": "no such folder /x",
                                                 "traceback": "Traceback...\n  line\nFileNotFoundError: /x"}))
    state, err, _ = manifest.cell_outcome(cell, 1)
    assert state is CellState.FAILED and err.endswith("FileNotFoundError: no such folder /x")
    (cell / "error.json").unlink()
    (cell / "stderr.log").write_text("noise\nboom: it broke\n")
    state, err, _ = manifest.cell_outcome(cell, 3)
    assert state is CellState.FAILED and "boom: it broke" in err and "exit code 3" in err


@pytest.mark.parametrize("kw, state", [({"timed_out": True}, CellState.TIMEOUT),
                                       ({"interrupted": True}, CellState.CANCELLED)])
def test_outcome_stopped_by_the_launcher(tmp_path, kw, state):
    assert manifest.cell_outcome(tmp_path, -15, **kw)[0] is state


def test_outcome_killed_by_a_signal_is_rerunnable(tmp_path):
    state, err, _ = manifest.cell_outcome(tmp_path, -9)
    assert state is CellState.CANCELLED and "SIGKILL" in err and state.failed


def test_move_aside_keeps_the_snapshot(tmp_path):
    cell = tmp_path / "c"
    cell.mkdir()
    for name in ("config.yaml", "result.json", "status.json", "checkpoint.pt", "claim.3"):
        (cell / name).write_text(name)
    (cell / "tb").mkdir()
    dest = manifest.move_aside(cell)
    assert sorted(p.name for p in cell.iterdir()) == ["claim.3", "config.yaml", "previous"]
    assert sorted(p.name for p in dest.iterdir()) == ["checkpoint.pt", "result.json", "status.json", "tb"]


def test_plans_list_cells_once_in_first_mention_order(tmp_path):
    b1, p1, p2, orphan = "b1" * 6, "a1" * 6, "a2" * 6, "0f" * 6  # cell ids: 12 hex digits
    manifest.write_plan(tmp_path, "a", [CellRecord(b1, ["x=1"], role="baseline"),
                                        CellRecord(p1, ["x=1", "t=1"], baseline=b1)])
    manifest.write_plan(tmp_path, "b", [CellRecord(p1, ["x=1", "t=1"], baseline=b1),
                                        CellRecord(p2, ["x=1", "t=2"], baseline=b1)])
    (tmp_path / "cells" / orphan).mkdir(parents=True)
    (tmp_path / "cells" / f"{p2}.damaged-20240101-000000").write_text("")  # set aside: not a cell
    ids = [r.id for r in manifest.read_plans(tmp_path)]
    assert ids == [b1, p1, p2, orphan]
