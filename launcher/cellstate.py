"""Cell states as every reader and writer of a sweep sees them: the one torch-free definition.

A cell's ``status.json`` holds a :class:`CellStatus`; no file means PENDING. The launcher (local pool,
Slurm jobs, ``launcher.status``) and the results tables (:mod:`launcher.results`, an app's own) read
states through this module, so there is one list of states, one rule for a RUNNING cell whose
owner is gone (:func:`effective_status`) and one rule for an entry that cannot be trusted: a
``status.json`` that is not JSON, names an unknown state or holds wrong types, or says DONE while
``result.json`` is missing, truncated or not a finished result, reads as DAMAGED with the reason in
``error`` (:func:`read_status`) — never as an exception. Standard library only.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from launcher.fileio import RESULT, read_json, write_json_atomic

CELLS = "cells"
STATUS = "status.json"

# A RUNNING cell on another host whose heartbeat is older than this is taken as interrupted. On the
# owner's own host the pid decides, so this only matters across machines (shared filesystem).
DEFAULT_STALE_AFTER_S = 120.0

HOST = socket.gethostname()
# Set by the launcher for a cell that asked for a GPU (a GPU Slurm profile, or a local cell pinned to a
# GPU); an app's cell reads it (this project's trials do) and never falls back to the CPU.
REQUIRE_GPU_ENV = "PROXYATTENTION_REQUIRE_GPU"
# What a cell id looks like (launcher.fileio.digest: the first 12 hex digits of a sha256). Ids read from
# files (plans) are checked against it before they name a folder.
CELL_ID = re.compile(r"[0-9a-f]{12}\Z")


def is_cell_id(text: object) -> bool:
    return isinstance(text, str) and CELL_ID.match(text) is not None


class CellState(str, enum.Enum):
    """Where a cell stands. The value is the name, so ``status.json`` reads ``"state": "DONE"``."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"
    DAMAGED = "DAMAGED"  # its status or result cannot be trusted (see read_status); never DONE, redone
    # Stopped early at a prune request (launcher.progress): finished, not failed, never rerun but by
    # rerun=all; its result.json is partial ("status": "pruned") and never read as a finished result.
    PRUNED = "PRUNED"

    @property
    def finished(self) -> bool:
        """Ended, one way or another (not PENDING, not RUNNING)."""
        return self not in (CellState.PENDING, CellState.RUNNING)

    @property
    def failed(self) -> bool:
        """Ended without a result one can trust: what ``rerun=failed`` reruns."""
        return self in (CellState.FAILED, CellState.TIMEOUT, CellState.CANCELLED, CellState.DAMAGED)

    @property
    def settled(self) -> bool:
        """Finished for good, as a launch sees it: DONE or PRUNED (a re-issue runs neither; the exit
        code is 0 when every cell is settled)."""
        return self in (CellState.DONE, CellState.PRUNED)


@dataclass
class Owner:
    """Who holds a claim: a process on a host (local), or a Slurm job (``job_id``)."""

    host: str
    pid: int
    start: Optional[int]  # the pid's start time in clock ticks since boot: guards against pid reuse
    token: str
    backend: str = "local"
    job_id: Optional[str] = None

    @classmethod
    def this_process(cls, backend: str = "local", job_id: Optional[str] = None) -> "Owner":
        pid = os.getpid()
        return cls(host=HOST, pid=pid, start=process_start(pid), token=secrets.token_hex(8),
                   backend=backend, job_id=job_id)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Owner":
        """The owner a claim file names; ``ValueError`` when it lacks a field or holds a wrong type."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k, v in kw.items():
            _check_type(k, v, _OWNER_TYPES[k])
        try:
            return cls(**kw)
        except TypeError as e:
            raise ValueError(str(e)) from None


_INT, _NUM, _STR = (int,), (int, float), (str,)
_OWNER_TYPES = {"host": _STR, "pid": _INT, "start": _INT + (None,), "token": _STR, "backend": _STR,
                "job_id": _STR + (None,)}


def _check_type(key: str, value: object, types: tuple) -> None:
    """``ValueError`` naming ``key`` unless ``value`` is one of ``types`` (None allowed when listed;
    a bool is not a number, NaN and infinities are not times)."""
    if value is None:
        if None in types:
            return
    elif isinstance(value, bool):
        if bool in types:
            return
    elif isinstance(value, tuple(t for t in types if t is not None)):
        if not (isinstance(value, float) and not math.isfinite(value)):
            return
    want = " or ".join("null" if t is None else {int: "an integer", float: "a number", str: "a string",
                                                  bool: "true/false", dict: "an object"}[t] for t in types
                       if not (t is int and float in types))
    raise ValueError(f"{key} is {json.dumps(value, default=str)[:40]}, not {want}")


_STATUS_FIELDS: set[str] = set()


@dataclass
class CellStatus:
    """The content of ``status.json``. Times are Unix seconds.

    ``pid`` is the cell process (the local child); ``owner_pid``/``host`` the process that owns the
    claim and writes this file; ``job_id`` the Slurm job, if any. ``metrics`` holds the few final
    metrics the summary and ``launcher.status`` show (so they never have to open ``result.json``).
    """

    state: CellState = CellState.PENDING
    attempts: int = 0
    backend: Optional[str] = None
    host: Optional[str] = None
    owner_pid: Optional[int] = None
    owner_start: Optional[int] = None
    pid: Optional[int] = None
    job_id: Optional[str] = None
    started: Optional[float] = None
    heartbeat: Optional[float] = None
    ended: Optional[float] = None
    duration_s: Optional[float] = None
    exit_code: Optional[int] = None
    error: Optional[str] = None
    interrupted: bool = False
    metrics: dict = field(default_factory=dict)
    result_size: Optional[int] = None  # bytes of result.json when the cell finished DONE (checked on read)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["state"] = self.state.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CellStatus":
        """The status a ``status.json`` object holds; ``ValueError`` saying what is wrong when its state is
        unknown or a field has the wrong type (unknown keys are ignored)."""
        names = _STATUS_FIELDS or _STATUS_FIELDS.update(f.name for f in dataclasses.fields(cls)) or _STATUS_FIELDS
        kw = {k: v for k, v in d.items() if k in names}
        state = kw.get("state", "PENDING")
        try:
            kw["state"] = CellState(state)
        except (ValueError, TypeError):
            raise ValueError(f"state {json.dumps(state, default=str)[:40]} is not a cell state") from None
        for k, v in kw.items():
            if k != "state":
                _check_type(k, v, _STATUS_TYPES[k])
        if kw.get("attempts", 0) < 0:
            raise ValueError(f"attempts is {kw['attempts']}, not a count")
        problem = _metrics_problem(kw.get("metrics", {}))
        if problem:
            raise ValueError(problem)
        return cls(**kw)

    def started_by(self, owner: Owner, pid: Optional[int] = None) -> "CellStatus":
        """A new attempt: RUNNING, ``attempts + 1``, owner and pid recorded, heartbeat now."""
        now = time.time()
        return dataclasses.replace(
            self, state=CellState.RUNNING, attempts=self.attempts + 1, backend=owner.backend,
            host=owner.host, owner_pid=owner.pid, owner_start=owner.start, pid=pid, job_id=owner.job_id,
            started=now, heartbeat=now, ended=None, duration_s=None, exit_code=None, error=None,
            interrupted=False, metrics={}, result_size=None)

    def beat(self) -> "CellStatus":
        return dataclasses.replace(self, heartbeat=time.time())

    def finished(self, state: CellState, *, exit_code: Optional[int] = None, error: Optional[str] = None,
                 metrics: Optional[dict] = None, interrupted: bool = False,
                 result_size: Optional[int] = None) -> "CellStatus":
        now = time.time()
        return dataclasses.replace(
            self, state=state, ended=now, heartbeat=now, exit_code=exit_code, error=error,
            duration_s=None if self.started is None else round(now - self.started, 3),
            metrics=metrics or {}, interrupted=interrupted, result_size=result_size)


_STATUS_TYPES: dict[str, tuple] = {
    "attempts": _INT, "backend": _STR + (None,), "host": _STR + (None,), "owner_pid": _INT + (None,),
    "owner_start": _INT + (None,), "pid": _INT + (None,), "job_id": _STR + (None,),
    "started": _NUM + (None,), "heartbeat": _NUM + (None,), "ended": _NUM + (None,),
    "duration_s": _NUM + (None,), "exit_code": _INT + (None,), "error": _STR + (None,),
    "interrupted": (bool,), "metrics": (dict,), "result_size": _INT + (None,)}


def _metrics_problem(metrics: object, where: str = "metrics") -> Optional[str]:
    """Why ``metrics`` is not an object of numbers (None, NaN allowed), or None when it is one."""
    if not isinstance(metrics, dict):
        return f"{where} is {type(metrics).__name__}, not an object"
    for k, v in metrics.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return f"{where}[{k!r}] is {json.dumps(v, default=str)[:40]}, not a number"
    return None


def damaged(reason: str, attempts: object = 0) -> CellStatus:
    """The status of a cell whose entry cannot be trusted: DAMAGED, ``reason`` as its error."""
    ok = isinstance(attempts, int) and not isinstance(attempts, bool) and attempts >= 0
    return CellStatus(state=CellState.DAMAGED, attempts=attempts if ok else 0, error=reason)  # type: ignore[arg-type]



# ---------------------------------------------------------------------------------------------------
# Folders


def cells_root(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / CELLS


def cell_dir(sweep_dir: Path, cell_id: str) -> Path:
    """The folder of one cell: ``SWEEP_DIR/cells/<cell_id>`` (deterministic: no dates, no job numbers)."""
    return Path(sweep_dir) / CELLS / cell_id


def read_status(cell: Path | str) -> CellStatus:
    """The cell's recorded status, never an exception.

    PENDING when it never started (no ``status.json``; ``error`` says so when the cell folder itself is
    missing: see :func:`folder_problem`). DAMAGED, with the reason in ``error``, when ``status.json``
    cannot be read or trusted (not JSON, an unknown state, a field of the wrong type), when it says DONE
    but ``result.json`` is missing, not the size it had when the cell finished, or not a finished result
    (:func:`result_problem`), and when there is no status but an unreadable ``result.json``.
    """
    path = os.path.join(cell, STATUS)  # str paths: 10k cells/s matter
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, NotADirectoryError):
        return _without_status(cell)
    except OSError as e:
        return damaged(f"{STATUS} cannot be read ({e.strerror or e})")
    try:
        d = json.loads(data)
    except ValueError:
        return damaged(f"{STATUS} is not valid JSON ({len(data)} bytes; truncated?)")
    if not isinstance(d, dict):
        return damaged(f"{STATUS} holds {type(d).__name__}, not an object")
    try:
        status = CellStatus.from_dict(d)
    except ValueError as e:
        return damaged(f"{STATUS}: {e}", d.get("attempts"))
    if status.state == CellState.DONE:
        problem = result_problem(cell, status.result_size)
        if problem is not None:
            return dataclasses.replace(status, state=CellState.DAMAGED, metrics={}, interrupted=False,
                                       error=f"{STATUS} says DONE but {problem}")
    return status


def _without_status(cell: Path | str) -> CellStatus:
    if not os.path.isdir(cell):
        return CellStatus(error=folder_problem(cell))
    if os.path.lexists(os.path.join(cell, RESULT)):  # a result nobody recorded: adoptable, or damaged
        problem = result_problem(cell)
        if problem is not None and read_pruned(cell) is None:  # a pruned result is adoptable too
            return damaged(f"no {STATUS}, and {problem}")
    return CellStatus()


def folder_problem(cell: Path | str) -> Optional[str]:
    """Why ``cell`` is not a cell folder one can read (None when it is a folder)."""
    cell = str(cell)
    if os.path.isdir(cell):
        return None
    if os.path.islink(cell):
        target = os.readlink(cell)
        if os.path.lexists(cell) and os.path.exists(cell):
            return f"its store entry ({target}) is a file, not a folder"
        return f"its store entry is gone (the link to {target} dangles); re-issue the sweep to run it again"
    if os.path.lexists(cell):
        return "it is a file, not a folder"
    return "its folder is missing; re-issue the sweep to run it again"


def write_status(cell: Path, status: CellStatus) -> None:
    """Replace ``status.json`` atomically. Call only while holding the cell's claim (one writer)."""
    write_json_atomic(Path(cell) / STATUS, status.to_dict())


def result_content_problem(d: object) -> Optional[str]:
    """Why a parsed ``result.json`` is not a finished result the readers can use (None when it is)."""
    if not isinstance(d, dict):
        return f"{RESULT} holds {type(d).__name__}, not an object"
    if d.get("status") != "done":
        return f"{RESULT} is not a finished result (status {json.dumps(d.get('status'), default=str)[:30]})"
    problem = _metrics_problem(d.get("metrics") or {}, f"{RESULT} metrics")
    if problem is not None:
        return problem
    for key in ("timing", "run", "data", "device"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            return f"{RESULT} {key} is {type(d[key]).__name__}, not an object"
    if d.get("history") is not None and not isinstance(d["history"], list):
        return f"{RESULT} history is {type(d['history']).__name__}, not a list"
    return None


def result_problem(cell: Path | str, size: Optional[int] = None) -> Optional[str]:
    """Why the cell's ``result.json`` cannot be trusted, or None.

    With ``size`` (recorded in ``status.json`` when the cell finished) a stat decides: a file of another
    size was truncated or replaced. Without it the file is read and checked (:func:`result_content_problem`).
    """
    path = os.path.join(cell, RESULT)
    try:
        if size is not None:
            now = os.stat(path).st_size
            if now == size:
                return None
            return f"{RESULT} is {now} bytes, not the {size} it had when the cell finished (truncated or replaced)"
        with open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, NotADirectoryError):
        return f"{RESULT} is missing"
    except OSError as e:
        return f"{RESULT} cannot be read ({e.strerror or e})"
    try:
        d = json.loads(data)
    except ValueError:
        return f"{RESULT} is not valid JSON ({len(data)} bytes; truncated?)"
    return result_content_problem(d)


def result_size(cell: Path | str) -> Optional[int]:
    """Bytes of the cell's ``result.json`` (None when it has none)."""
    try:
        return os.stat(os.path.join(cell, RESULT)).st_size
    except OSError:
        return None


def read_result(cell: Path) -> Optional[dict]:
    """``result.json`` if it parses, says ``"status": "done"`` and has the types its readers need, else None."""
    d = read_json(Path(cell) / RESULT)
    return d if d is not None and result_content_problem(d) is None else None


PRUNED_RESULT = "pruned"  # the "status" of the partial result.json of a cell stopped at a prune request


def read_pruned(cell: Path | str) -> Optional[dict]:
    """The partial ``result.json`` of a cell stopped at a prune request (``"status": "pruned"``, a
    ``"pruned"`` object, metrics of numbers), else None. Never a finished result (:func:`read_result`)."""
    d = read_json(os.path.join(cell, RESULT))
    if d is None or d.get("status") != PRUNED_RESULT or not isinstance(d.get("pruned"), dict):
        return None
    if _metrics_problem(d.get("metrics") or {}) is not None:
        return None
    return d


def pruned_note(result: dict) -> str:
    """``pruned after epoch 2 of 4: <reason>``: the one line a PRUNED cell's status carries as its error."""
    p = result.get("pruned") or {}
    epoch, epochs = p.get("epoch"), p.get("epochs")
    where = f"after epoch {epoch}" + (f" of {epochs}" if epochs is not None else "") if epoch is not None else ""
    reason = str(p.get("reason") or "").strip().splitlines()
    return f"pruned {where}".rstrip() + (f": {reason[0]}" if reason else "")


# ---------------------------------------------------------------------------------------------------
# Liveness


def process_start(pid: int) -> Optional[int]:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``), None if unknown or gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing ')'.
    fields = stat[stat.rindex(b")") + 2:].split()
    try:
        return int(fields[19])  # field 22 of /proc/PID/stat
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, start: Optional[int] = None) -> bool:
    """Whether ``pid`` runs on this host (and, when ``start`` is known, is the same process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start is not None:
        now_start = process_start(pid)
        if now_start is not None and now_start != start:
            return False
    return True


def cell_process_alive(pid: int, cell: Path | str) -> bool:
    """Whether ``pid`` is a live cell process working in ``cell`` on this host (by its command line:
    the cell's real path, whatever sweep folder links it)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")
    except OSError:
        return False
    return os.path.realpath(cell).encode() in cmd


def owner_gone(host: Optional[str], pid: Optional[int], start: Optional[int], heartbeat: Optional[float],
               stale_after_s: float = DEFAULT_STALE_AFTER_S, now: Optional[float] = None) -> bool:
    """Whether the owner of a claim or RUNNING status can no longer be working on the cell.

    On this host the pid decides (a live pid is trusted however old its heartbeat). Elsewhere only the
    heartbeat can tell: older than ``stale_after_s`` means gone.
    """
    if host == HOST and pid is not None:
        return not pid_alive(pid, start)
    if heartbeat is None:
        return True
    return (now if now is not None else time.time()) - heartbeat > stale_after_s


ORPHANED = "orphaned: "  # how the error of a RUNNING cell whose launcher is gone but whose process lives begins


def effective_status(status: CellStatus, stale_after_s: float = DEFAULT_STALE_AFTER_S,
                     now: Optional[float] = None, cell: Optional[Path | str] = None) -> CellStatus:
    """The status as it really is: a RUNNING cell whose owner is gone is CANCELLED, ``interrupted`` —
    unless (given its ``cell`` folder) its cell process still runs on this host: then it stays RUNNING,
    its ``error`` saying it is orphaned (a re-issue takes it over; it resumes from its checkpoint).

    Backends that know better (Slurm via sacct) refine RUNNING cells of their own ``backend`` further.
    """
    if status.state != CellState.RUNNING or status.backend not in (None, "local"):
        return status
    if not owner_gone(status.host, status.owner_pid, status.owner_start, status.heartbeat,
                      stale_after_s, now):
        return status
    who = f"pid {status.owner_pid} on {status.host}"
    if (cell is not None and status.pid is not None and status.host == HOST
            and cell_process_alive(status.pid, cell)):
        return dataclasses.replace(status, error=f"{ORPHANED}its launcher ({who}) is gone but the cell process "
                                   f"(pid {status.pid}) still runs; re-issue the sweep to take it over")
    return dataclasses.replace(status, state=CellState.CANCELLED, interrupted=True,
                               error=f"interrupted: its launcher ({who}) is gone; rerun to resume")


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*(?:[A-Z]\w*)?(?:Error|Exception|Exit|Interrupt)(?::|$)")


def error_headline(text: Optional[str], limit: int = 160) -> str:
    """The line of a cell's error text a reader needs, stripped and cut to ``limit`` characters.

    That is the last line naming an exception (``ValueError: …``: the end of a traceback) where there
    is one, else the first non-empty line (``exit code 1``, ``timed out: …``).
    """
    lines = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    raised = [ln for ln in lines if _EXCEPTION_LINE.match(ln)]
    line = raised[-1] if raised else (lines[0] if lines else "")
    return line if len(line) <= limit else line[: limit - 1] + "…"

