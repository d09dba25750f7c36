"""Cell states as every reader and writer of a sweep sees them: the one torch-free definition.

A cell's ``status.json`` holds a :class:`CellStatus`; no file means PENDING. The launcher (local pool,
Slurm jobs, ``launcher.status``) and the results table (:mod:`proxyattention.analysis.table`) read
states through this module, so there is one list of states and one rule for a RUNNING cell whose
owner is gone (:func:`effective_status`). Standard library only.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from proxyattention.fileio import RESULT, read_json, write_json_atomic

CELLS = "cells"
STATUS = "status.json"

# A RUNNING cell on another host whose heartbeat is older than this is taken as interrupted. On the
# owner's own host the pid decides, so this only matters across machines (shared filesystem).
DEFAULT_STALE_AFTER_S = 120.0

HOST = socket.gethostname()
# Set by the launcher for a cell that asked for a GPU (a GPU Slurm profile, or a local cell pinned to a
# GPU); read by the trial (proxyattention.device): such a cell never falls back to the CPU.
REQUIRE_GPU_ENV = "PROXYATTENTION_REQUIRE_GPU"

class CellState(str, enum.Enum):
    """Where a cell stands. The value is the name, so ``status.json`` reads ``"state": "DONE"``."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"

    @property
    def finished(self) -> bool:
        """Ended, one way or another (not PENDING, not RUNNING)."""
        return self not in (CellState.PENDING, CellState.RUNNING)

    @property
    def failed(self) -> bool:
        """Ended without a result: what ``rerun=failed`` reruns."""
        return self in (CellState.FAILED, CellState.TIMEOUT, CellState.CANCELLED)


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
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


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

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["state"] = self.state.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CellStatus":
        names = _STATUS_FIELDS or _STATUS_FIELDS.update(f.name for f in dataclasses.fields(cls)) or _STATUS_FIELDS
        kw = {k: v for k, v in d.items() if k in names}
        kw["state"] = CellState(kw.get("state", "PENDING"))
        return cls(**kw)

    def started_by(self, owner: Owner, pid: Optional[int] = None) -> "CellStatus":
        """A new attempt: RUNNING, ``attempts + 1``, owner and pid recorded, heartbeat now."""
        now = time.time()
        return dataclasses.replace(
            self, state=CellState.RUNNING, attempts=self.attempts + 1, backend=owner.backend,
            host=owner.host, owner_pid=owner.pid, owner_start=owner.start, pid=pid, job_id=owner.job_id,
            started=now, heartbeat=now, ended=None, duration_s=None, exit_code=None, error=None,
            interrupted=False, metrics={})

    def beat(self) -> "CellStatus":
        return dataclasses.replace(self, heartbeat=time.time())

    def finished(self, state: CellState, *, exit_code: Optional[int] = None, error: Optional[str] = None,
                 metrics: Optional[dict] = None, interrupted: bool = False) -> "CellStatus":
        now = time.time()
        return dataclasses.replace(
            self, state=state, ended=now, heartbeat=now, exit_code=exit_code, error=error,
            duration_s=None if self.started is None else round(now - self.started, 3),
            metrics=metrics or {}, interrupted=interrupted)



# ---------------------------------------------------------------------------------------------------
# Folders


def cells_root(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / CELLS


def cell_dir(sweep_dir: Path, cell_id: str) -> Path:
    """The folder of one cell: ``SWEEP_DIR/cells/<cell_id>`` (deterministic: no dates, no job numbers)."""
    return Path(sweep_dir) / CELLS / cell_id


def read_status(cell: Path | str) -> CellStatus:
    """The cell's recorded status; PENDING when it never started."""
    d = read_json(os.path.join(cell, STATUS))  # type: ignore[arg-type]  # str paths: 10k cells/s matter
    return CellStatus() if d is None else CellStatus.from_dict(d)


def write_status(cell: Path, status: CellStatus) -> None:
    """Replace ``status.json`` atomically. Call only while holding the cell's claim (one writer)."""
    write_json_atomic(Path(cell) / STATUS, status.to_dict())


def read_result(cell: Path) -> Optional[dict]:
    """``result.json`` if it parses and says ``"status": "done"``, else None."""
    d = read_json(Path(cell) / RESULT)
    return d if d is not None and d.get("status") == "done" else None


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


def effective_status(status: CellStatus, stale_after_s: float = DEFAULT_STALE_AFTER_S,
                     now: Optional[float] = None) -> CellStatus:
    """The status as it really is: a RUNNING cell whose owner is gone is CANCELLED, ``interrupted``.

    Backends that know better (Slurm via sacct) refine RUNNING cells of their own ``backend`` further.
    """
    if status.state != CellState.RUNNING or status.backend not in (None, "local"):
        return status
    if not owner_gone(status.host, status.owner_pid, status.owner_start, status.heartbeat,
                      stale_after_s, now):
        return status
    who = f"pid {status.owner_pid} on {status.host}"
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

