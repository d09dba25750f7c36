"""Damage to the cell store, and a store that stops taking writes: nothing crashes, nothing damaged is
trusted as DONE, every reader names the cell and why, and a re-issue repairs or redoes it.

Stand-in cells (tests/fakecell.py) run every sweep here; a ``sitecustomize`` module put on the launcher's
``PYTHONPATH`` simulates a full disk (ENOSPC at the Nth ``status.json`` write) or a read-only store
(EROFS for every write under a folder), which ``chmod`` cannot do for root.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakecell import cells, runs
from waiting import wait_for

from launcher import cellstate, fileio, manifest
from launcher.cellstate import CellState, CellStatus
from launcher.local import LocalOptions, LocalRunner
from launcher.manifest import Rerun
from proxyattention.analysis import table

STORE_SHIM = r'''
import builtins, errno, io, os
from launcher import fileio

_fail_at = int(os.environ.get("FAKE_STATUS_WRITE_FAIL_AT", "0"))  # ENOSPC at this status.json write
_calls = [0]
if _fail_at:
    _write = fileio.write_text_atomic

    def write_text_atomic(path, text, fsync=True):
        if os.path.basename(str(path)) == "status.json":
            _calls[0] += 1
            if _calls[0] == _fail_at:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return _write(path, text, fsync=fsync)

    fileio.write_text_atomic = write_text_atomic

_ro = os.environ.get("FAKE_READONLY")  # every write under this folder: EROFS
if _ro:
    _ro = os.path.realpath(_ro)

    def _under(p):
        try:
            p = os.path.realpath(os.fspath(p))
        except TypeError:
            return False
        return p == _ro or p.startswith(_ro + os.sep)

    def _refuse(p):
        raise OSError(errno.EROFS, "Read-only file system", os.fspath(p))

    def _guard(fn, writes=lambda *a, **k: True):
        def guarded(p, *a, **k):
            if writes(*a, **k) and _under(p):
                _refuse(p)
            return fn(p, *a, **k)
        return guarded

    _open = io.open
    def _writes_mode(mode="r", *a, **k):
        return any(c in mode for c in "wax+")
    builtins.open = io.open = _guard(_open, _writes_mode)
    _os_open = os.open
    os.open = _guard(_os_open, lambda flags, *a, **k: flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    for name in ("mkdir", "unlink", "remove", "rmdir", "utime"):
        setattr(os, name, _guard(getattr(os, name)))
    for name in ("link", "symlink", "rename", "replace"):
        fn = getattr(os, name)
        def two(src, dst, *a, _fn=fn, **k):
            if _under(src) or _under(dst):
                _refuse(dst if _under(dst) else src)
            return _fn(src, dst, *a, **k)
        setattr(os, name, two)
'''

STUBBORN_CELL = r'''
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a cell slow to stop: the launcher's grace period applies
open(os.path.join(sys.argv[1], "runs.log"), "a").write(f"{os.getpid()}\n")
time.sleep(120)
'''


def store() -> Path:
    return Path(os.environ["PROXYATTENTION_STORE"])


def shimmed(fake) -> None:
    """Put the store shim beside the stand-in cell (on the launcher's PYTHONPATH; inactive unless asked)."""
    (fake.sweep.parent / "fakecell" / "sitecustomize.py").write_text(STORE_SHIM)


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.strip() and "HYDRA_FULL_ERROR" not in ln]


def by_threshold(sweep: Path) -> dict[str, str]:
    """``"0.1"``/``"baseline"`` → cell id, read from the cells' snapshots."""
    import yaml

    out = {}
    for d in (sweep / "cells").iterdir():
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        out[str(cfg["proxy"]["threshold"]) if cfg["proxy"]["enabled"] else "baseline"] = d.name
    return out


def status_of(sweep: Path, run_module) -> subprocess.CompletedProcess:
    return run_module("launcher.status", str(sweep), cwd=sweep.parent)


# --- 2: a cell gone from the store ------------------------------------------------------------------

def test_a_cell_deleted_from_the_store_is_listed_then_made_and_run_again(fake, run_module, tmp_path):
    first = fake("proxy.threshold=0.1,0.4")
    assert first.returncode == 0, first.stdout + first.stderr
    ids = by_threshold(fake.sweep)
    gone, filed = ids["0.4"], ids["0.1"]
    import shutil

    shutil.rmtree(store() / gone)  # deleted from the store: the sweep's link dangles
    shutil.rmtree(store() / filed)
    (store() / filed).write_text("not a cell")  # a file where the cell folder was

    df = table.load_results(fake.sweep)  # the report never drops them, and never calls them DONE
    rows = df.set_index("cell_id")
    assert set(rows.index) == set(ids.values())
    assert rows.loc[gone, "state"] == "PENDING" and "missing" in rows.loc[gone, "problem"]
    assert "is a file" in rows.loc[filed, "problem"]
    status = status_of(fake.sweep, run_module)
    assert status.returncode == 0 and "PENDING (missing)" in status.stdout, status.stdout + status.stderr

    dry = fake("proxy.threshold=0.1,0.4", "hydra.launcher.dry_run=true")
    assert dry.returncode == 0 and "dry run: 2 of 3 cells would run" in dry.stdout, dry.stdout + dry.stderr
    again = fake("proxy.threshold=0.1,0.4")
    assert again.returncode == 0, again.stdout + again.stderr
    no_traceback(again)
    got = cells(fake.sweep)
    assert all(c["state"] == "DONE" for c in got.values())
    assert runs(fake.sweep, gone) == 1 and runs(fake.sweep, filed) == 1  # made again, run again
    assert runs(fake.sweep, ids["baseline"]) == 1  # the intact cell was not
    assert (store() / gone).is_dir() and (fake.sweep / "cells" / gone).resolve() == (store() / gone).resolve()
    (aside,) = store().glob(f"{filed}.damaged-*")
    assert aside.read_text() == "not a cell"


def test_a_file_in_place_of_a_sweep_link_is_moved_aside_and_the_link_repaired(fake):
    assert fake("proxy.threshold=0.1").returncode == 0
    cid = by_threshold(fake.sweep)["0.1"]
    link = fake.sweep / "cells" / cid
    link.unlink()
    link.write_text("oops")
    again = fake("proxy.threshold=0.1")
    assert again.returncode == 0 and "All 2 cells are DONE" in again.stdout, again.stdout + again.stderr
    assert link.is_symlink() and link.resolve() == (store() / cid).resolve()
    assert runs(fake.sweep, cid) == 1  # its store entry was intact: reused, not run again
    (aside,) = (fake.sweep / "cells").glob(f"{cid}.damaged-*")
    assert aside.read_text() == "oops"


# --- 3 and 4: entries that cannot be trusted ---------------------------------------------------------

@pytest.mark.parametrize("content, reason", [
    ({"state": "BOGUS", "attempts": 1}, "state \"BOGUS\" is not a cell state"),
    ({"state": "DONE", "attempts": 1, "metrics": [1, 2]}, "metrics is [1, 2], not an object"),
    ({"state": "RUNNING", "attempts": "two"}, "attempts is \"two\""),
    ({"state": "FAILED", "attempts": 1, "pid": 1.5}, "pid is 1.5"),
    ('{"state": "DO', "not valid JSON"),
    ([1, 2], "not an object"),
])
def test_a_status_that_cannot_be_trusted_reads_damaged(tmp_path, content, reason):
    (tmp_path / "status.json").write_text(content if isinstance(content, str) else json.dumps(content))
    s = cellstate.read_status(tmp_path)
    assert s.state == CellState.DAMAGED and reason in s.error
    assert s.state.failed and Rerun.FAILED.wants(s.state) and Rerun.DAMAGED.wants(s.state)
    assert not Rerun.DAMAGED.wants(CellState.FAILED)


@pytest.mark.parametrize("result, reason", [
    (None, "result.json is missing"),
    ('{"status": "done", "metr', "not valid JSON"),
    ({"status": "done", "metrics": [0.5]}, "metrics is list"),
    ({"status": "done", "metrics": {"test/acc": "high"}}, "not a number"),
    ({"status": "running"}, "not a finished result"),
])
def test_a_done_status_needs_a_result_it_can_trust(tmp_path, result, reason):
    cellstate.write_status(tmp_path, CellStatus(state=CellState.DONE, attempts=1))
    if result is not None:
        (tmp_path / "result.json").write_text(result if isinstance(result, str) else json.dumps(result))
    s = cellstate.read_status(tmp_path)
    assert s.state == CellState.DAMAGED and reason in s.error and s.attempts == 1


def test_a_recorded_result_size_catches_truncation_with_a_stat(tmp_path):
    (tmp_path / "result.json").write_text(json.dumps({"status": "done", "metrics": {"test/acc": 0.5}}))
    done = CellStatus(state=CellState.DONE, attempts=1, result_size=cellstate.result_size(tmp_path))
    cellstate.write_status(tmp_path, done)
    assert cellstate.read_status(tmp_path).state == CellState.DONE
    with open(tmp_path / "result.json", "r+b") as f:
        f.truncate(10)
    s = cellstate.read_status(tmp_path)
    assert s.state == CellState.DAMAGED and "truncated" in s.error


def test_damaged_is_a_rerun_value_named_in_its_message():
    assert Rerun.parse("damaged") is Rerun.DAMAGED
    with pytest.raises(ValueError, match="damaged"):
        Rerun.parse("bogus")


def test_damaged_statuses_are_named_by_every_reader_and_redone(fake, run_module):
    first = fake("proxy.threshold=0.1")
    assert first.returncode == 0, first.stdout + first.stderr
    ids = by_threshold(fake.sweep)
    bogus, typed = ids["0.1"], ids["baseline"]
    (fake.sweep / "cells" / bogus / "status.json").write_text(json.dumps({"state": "BOGUS", "attempts": 1}))
    cell = fake.sweep / "cells" / typed
    d = json.loads((cell / "status.json").read_text())
    d["metrics"] = [0.5]
    (cell / "status.json").write_text(json.dumps(d))

    status = status_of(fake.sweep, run_module)
    assert status.returncode == 0, status.stdout + status.stderr
    no_traceback(status)
    assert "2 DAMAGED" in status.stdout and "BOGUS" in status.stdout and "metrics is [0.5]" in status.stdout
    df = table.load_results(fake.sweep).set_index("cell_id")
    assert set(df["state"]) == {"DAMAGED"} and "BOGUS" in df.loc[bogus, "problem"]

    dry = fake("proxy.threshold=0.1", "hydra.launcher.dry_run=true")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    no_traceback(dry)
    assert "dry run: 2 of 2 cells would run" in dry.stdout
    line = next(ln for ln in dry.stdout.splitlines() if ln.startswith("DAMAGED") and bogus in ln)
    assert "BOGUS" in line

    again = fake("proxy.threshold=0.1", "hydra.launcher.rerun=damaged")
    assert again.returncode == 0, again.stdout + again.stderr
    got = cells(fake.sweep)
    assert all(c["state"] == "DONE" for c in got.values())
    assert got[bogus]["attempts"] == 2  # the attempts the damaged status still told
    for cid in (bogus, typed):  # redone from scratch, the damaged attempt's files kept aside
        assert runs(fake.sweep, cid) == 1
        (aside,) = (fake.sweep / "cells" / cid).glob("damaged-*")
        assert (aside / "status.json").exists() and (aside / "result.json").exists()
        assert len((aside / "runs.log").read_text().splitlines()) == 1
    (aside,) = (fake.sweep / "cells" / bogus).glob("damaged-*")
    assert json.loads((aside / "status.json").read_text())["state"] == "BOGUS"


def test_a_truncated_result_is_not_done_and_is_redone_by_rerun_failed(fake, run_module):
    from proxyattention.analysis.report import ReportConfig, build_report

    first = fake("proxy.threshold=0.1")
    assert first.returncode == 0, first.stdout + first.stderr
    ids = by_threshold(fake.sweep)
    for cid in ids.values():  # every result unreadable
        result = fake.sweep / "cells" / cid / "result.json"
        result.write_text(result.read_text()[:25])
    got = cells(fake.sweep)
    assert all(c["state"] == "DAMAGED" and "result.json" in c["error"] for c in got.values())
    md = build_report(fake.sweep, ReportConfig(maps=0, tb_check=0)).read_text()
    assert "Every cell is DONE" not in md and "## Problems" in md
    assert all(f"- {cid}: DAMAGED" in md for cid in ids.values())

    again = fake("proxy.threshold=0.1", "hydra.launcher.rerun=failed")
    assert again.returncode == 0, again.stdout + again.stderr
    got = cells(fake.sweep)
    assert all(c["state"] == "DONE" and c["attempts"] == 2 for c in got.values())
    for cid in ids.values():
        (aside,) = (fake.sweep / "cells" / cid).glob("damaged-*")
        assert len((aside / "result.json").read_text()) == 25  # the damaged file, kept


def test_rerun_damaged_leaves_failed_cells_alone(fake):
    first = fake("proxy.threshold=0.1,0.4", env={"FAKE_FAIL": "0.4"})
    assert first.returncode == 1
    ids = by_threshold(fake.sweep)
    (fake.sweep / "cells" / ids["0.1"] / "result.json").write_text("{")
    again = fake("proxy.threshold=0.1,0.4", "hydra.launcher.rerun=damaged", env={"FAKE_FAIL": "0.4"})
    assert again.returncode == 1  # the FAILED cell is still not DONE
    got = cells(fake.sweep)
    assert got[ids["0.1"]]["state"] == "DONE" and got[ids["0.1"]]["attempts"] == 2
    assert len(list((fake.sweep / "cells" / ids["0.1"]).glob("damaged-*"))) == 1
    assert got[ids["0.4"]]["state"] == "FAILED" and got[ids["0.4"]]["attempts"] == 1
    assert runs(fake.sweep, ids["0.4"]) == 1


# --- 5: a store that takes no more writes -----------------------------------------------------------

def test_a_full_disk_mid_sweep_stops_the_cells_prints_the_summary_and_one_line(fake):
    shimmed(fake)
    proc = fake("proxy.threshold=0.1,0.4", "hydra.launcher.workers=2",
                env={"FAKE_SLEEP": "60", "FAKE_STATUS_WRITE_FAIL_AT": "3"})  # the first heartbeat
    assert proc.returncode == 1, proc.stdout + proc.stderr
    no_traceback(proc)
    (line,) = error_lines(proc)
    assert "No space left on device" in line and "status.json" in line and "re-issue" in line
    assert "3 cells:" in proc.stdout and "sweep folder:" in proc.stdout  # the summary
    got = cells(fake.sweep)
    started = [cid for cid, c in got.items() if c["attempts"]]  # (a cell may be stopped before it logs)
    assert len(started) == 2
    for cid in started:  # stopped, and marked: the failed write was the only one
        assert got[cid]["state"] == "CANCELLED" and got[cid]["interrupted"]
        pid = json.loads((fake.sweep / "cells" / cid / "status.json").read_text())["pid"]
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
    assert [c["state"] for cid, c in got.items() if cid not in started] == ["PENDING"]  # never started

    again = fake("proxy.threshold=0.1,0.4", "hydra.launcher.workers=2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert all(c["state"] == "DONE" for c in cells(fake.sweep).values())


def test_a_read_only_store_is_refused_in_one_line_on_a_reissue(fake):
    first = fake("proxy.threshold=0.1,0.4", env={"FAKE_FAIL": "0.4"})
    assert first.returncode == 1
    shimmed(fake)
    before = sorted((p, p.stat().st_mtime_ns) for p in store().rglob("*"))
    proc = fake("proxy.threshold=0.1,0.4", env={"FAKE_READONLY": str(store())})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    no_traceback(proc)
    (line,) = error_lines(proc)
    assert "Read-only file system" in line and str(store().resolve()) in line
    assert sorted((p, p.stat().st_mtime_ns) for p in store().rglob("*")) == before


def test_write_failures_in_process_stop_every_running_cell(fake, monkeypatch):
    """The local pool itself: ENOSPC at the Nth write, raised to the caller after stopping the cells."""
    planned = fake("proxy.threshold=0.1,0.4", "hydra.launcher.rerun=failed")  # plans and writes, runs nothing
    assert "No cell matches" in planned.stdout, planned.stdout + planned.stderr
    monkeypatch.setenv("PYTHONPATH", str(fake.sweep.parent / "fakecell"))
    monkeypatch.setenv("FAKE_SLEEP", "60")
    calls = []
    real = fileio.write_text_atomic

    def failing(path, text, fsync=True):
        calls.append(path)
        if len(calls) >= 6:  # the writes after the two starts (metadata + status each): every one fails
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text, fsync=fsync)

    monkeypatch.setattr(fileio, "write_text_atomic", failing)
    monkeypatch.setattr(manifest, "write_text_atomic", failing)
    records = manifest.read_plans(fake.sweep)
    opts = LocalOptions(workers=2, cell_module="fake_cell", heartbeat_s=0.3, gpus="", store=str(store()))
    import io

    from launcher.console import Console

    shown = io.StringIO()
    runner = LocalRunner(fake.sweep, records, opts, console=Console(records, stream=shown))
    t0 = time.time()
    with pytest.raises(OSError) as raised:
        runner.run()
    assert raised.value.errno == errno.ENOSPC and time.time() - t0 < 30
    out = shown.getvalue()
    assert "Stopped: a write failed" in out and "3 cells: 2 CANCELLED, 1 PENDING" in out  # the summary
    started = [r.id for r in records if cellstate.read_status(fake.sweep / "cells" / r.id).attempts]
    assert len(started) == 2
    for cid in started:  # killed, although their end could not be recorded
        status = cellstate.read_status(fake.sweep / "cells" / cid)
        assert status.state == CellState.RUNNING and status.pid is not None
        assert not cellstate.cell_process_alive(status.pid, fake.sweep / "cells" / cid)


def test_a_refused_store_leaves_no_sweep_folder(fake, tmp_path):
    (tmp_path / "a_file").write_text("")
    proc = fake("proxy.threshold=0.1", f"hydra.launcher.store={tmp_path / 'a_file' / 'store'}")
    assert proc.returncode == 1 and "hydra.launcher.store=" in proc.stderr, proc.stdout + proc.stderr
    assert not fake.sweep.exists()


# --- 6: a dry run reads the store --------------------------------------------------------------------

def test_a_dry_run_into_a_new_sweep_folder_reads_the_store(fake, tmp_path):
    assert fake("proxy.threshold=0.1").returncode == 0
    dry = fake("proxy.threshold=0.1,0.4", "hydra.launcher.dry_run=true", sweep_dir=tmp_path / "other")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "dry run: 1 of 3 cells would run" in dry.stdout
    assert not (tmp_path / "other").exists()


def test_a_slurm_dry_run_into_a_new_sweep_folder_reads_the_store(fake, tmp_path):
    """The Slurm backend's dry run reads cells as the local one does: a cell DONE in the store is not one
    to submit, a DAMAGED one is named and would be redone (``rerun=damaged``: it alone)."""
    assert fake("proxy.threshold=0.1").returncode == 0
    ids = by_threshold(fake.sweep)
    result = store() / ids["0.1"] / "result.json"
    result.write_text(result.read_text()[:25])
    other = tmp_path / "other"

    def slurm_dry_run(*overrides: str) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "launcher", "model=test_resnet", "proxy.threshold=0.1,0.4", *overrides,
                "hydra/launcher=slurm", "hydra.launcher.dry_run=true", f"hydra.sweep.dir={other}"]
        proc = subprocess.run(args, cwd=tmp_path, text=True, capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        no_traceback(proc)
        return proc

    dry = slurm_dry_run()
    rows = {ln.split()[0]: ln.split() for ln in dry.stdout.splitlines() if ln.split()[:1] and ln.split()[0]
            in ids.values()}
    assert rows[ids["baseline"]][-3:] == ["DONE", "-", "no"], dry.stdout  # reused from the store
    assert rows[ids["0.1"]][-3:] == ["DAMAGED", "-", "yes"], dry.stdout
    line = next(ln for ln in dry.stdout.splitlines() if ln.startswith("DAMAGED") and ids["0.1"] in ln)
    assert "result.json" in line
    assert "dry run: 2 of 3 cells would be submitted" in dry.stdout, dry.stdout  # the damaged and the new
    dry = slurm_dry_run("hydra.launcher.rerun=damaged")
    assert "dry run: 1 of 3 cells would be submitted" in dry.stdout, dry.stdout
    assert not other.exists() and len((store() / ids["0.1"] / "result.json").read_text()) == 25
    assert not list((store() / ids["0.1"]).glob("damaged-*"))  # a dry run moves nothing


# --- 8: plan files name cells, nothing else -------------------------------------------------------------

def test_a_crafted_cell_id_in_a_plan_file_is_refused_naming_the_file(fake, run_module, tmp_path):
    assert fake("proxy.threshold=0.1").returncode == 0
    (plan_file,) = (fake.sweep / "plans").glob("*.json")
    d = json.loads(plan_file.read_text())
    victim = d["cells"][0]["id"]
    d["cells"][0]["id"] = "../../outside"
    d["job_cells"] = ["../../outside" if j == victim else j for j in d["job_cells"]]
    plan_file.write_text(json.dumps(d))
    proc = fake("proxy.threshold=0.1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    no_traceback(proc)
    (line,) = error_lines(proc)
    assert str(plan_file) in line and "not a cell id" in line
    status = status_of(fake.sweep, run_module)
    assert status.returncode == 2 and str(plan_file) in status.stderr and "Traceback" not in status.stderr
    with pytest.raises(table.ResultsError, match="not a cell id"):
        table.load_results(fake.sweep)
    assert not (tmp_path / "outside").exists() and not (fake.sweep.parent.parent / "outside").exists()


# --- 9: smaller ------------------------------------------------------------------------------------------

def test_an_adopted_result_counts_its_attempt_and_duration(fake):
    planned = fake("proxy.threshold=0.1", "hydra.launcher.rerun=failed")  # plans and writes, runs nothing
    assert "No cell matches" in planned.stdout, planned.stdout + planned.stderr
    cid = by_threshold(fake.sweep)["0.1"]
    result = {"status": "done", "metrics": {"test/acc": 0.5}, "timing": {"total_s": 7.5}}
    (fake.sweep / "cells" / cid / "result.json").write_text(json.dumps(result))  # its launcher died first
    again = fake("proxy.threshold=0.1")
    assert again.returncode == 0, again.stdout + again.stderr
    c = cells(fake.sweep)[cid]
    assert c["state"] == "DONE" and c["attempts"] == 1 and c["duration_s"] == 7.5
    assert runs(fake.sweep, cid) == 0  # adopted, not run


def test_a_second_ctrl_c_kills_the_cells_at_once_without_a_traceback(fake):
    (fake.sweep.parent / "fakecell" / "fake_cell.py").write_text(STUBBORN_CELL)  # ignores SIGTERM
    proc = fake("proxy=none", "proxy.schedule=2", background=True)
    status = wait_for(lambda: next(iter(fake.sweep.glob("cells/*/status.json")), None))
    wait_for(lambda: (status.parent / "runs.log").exists())
    child = int((status.parent / "runs.log").read_text().split()[0])
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)  # inside the grace period (launcher.local.KILL_GRACE_S)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert time.time() - t0 < 3.5, out + err  # not the rest of the grace period
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "killed at once" in out
    wait_for(lambda: not Path(f"/proc/{child}").exists()
             or Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", timeout=5)
    (c,) = cells(fake.sweep).values()
    assert c["state"] == "CANCELLED"
