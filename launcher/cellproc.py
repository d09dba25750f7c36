"""One attempt of one cell as a child process, the same for every backend.

A cell runs as ``python -m <cell_module> CELL_DIR`` in a new session (its own process group, so stopping
it stops everything it started, and its GPU memory is freed when it exits), with its output appended to
the cell's ``stdout.log``/``stderr.log`` under a header naming the attempt, the host and the command.
While it runs, its owner refreshes the claim and ``status.json`` every ``heartbeat_s``. The local
launcher runs it in a worker thread; a Slurm array task runs it on its node (:mod:`launcher.slurm_job`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from launcher.cellstate import CellState, CellStatus, result_size, write_status
from launcher.manifest import STDERR, STDOUT, Claim, cell_outcome

CELL_MODULE = "launcher.taskcell"  # any Hydra app's task function; an app with its own cells names its module


@dataclass
class CellProcess:
    """How to start a cell: interpreter, module, extra environment, a note for the log header."""

    cell: Path
    module: str = CELL_MODULE
    python: str = ""
    env: dict[str, str] = field(default_factory=dict)
    note: str = ""
    preexec_fn: Optional[Callable[[], None]] = None

    def command(self) -> list[str]:
        # The real path, so a later launcher from another folder or sweep recognises an orphan of this cell.
        return [self.python or sys.executable, "-m", self.module, os.path.realpath(self.cell)]

    def start(self, attempt: int, host: str) -> subprocess.Popen:
        """Write the attempt header to both logs and start the process in its own session."""
        cmd = self.command()
        header = (f"\n===== attempt {attempt} on {host} at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{' '.join(cmd)}{' (' + self.note + ')' if self.note else ''}\n").encode()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.cell / STDOUT, "ab") as out, open(self.cell / STDERR, "ab") as err:
            out.write(header)
            err.write(header)
            out.flush()
            err.flush()
            return subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True, preexec_fn=self.preexec_fn)


def watch(proc: subprocess.Popen, cell: Path, claim: Claim, status: CellStatus, heartbeat_s: float, *,
          until: Optional[float] = None, stop: Callable[[], bool] = lambda: False,
          poll_s: float = 1.0, tick: Optional[Callable[[], None]] = None) -> tuple[Optional[int], CellStatus]:
    """Wait for the cell process, heartbeating its claim and status.

    Returns ``(exit code, status)`` when it exits, or ``(None, status)`` when the wall-clock time
    ``until`` passes or ``stop()`` turns true (the caller decides how to stop it). ``tick()`` is called
    after every heartbeat (the local console shows the cell's progress from it).
    """
    next_beat = time.monotonic() + heartbeat_s
    while True:
        wait = min(poll_s, heartbeat_s)
        if until is not None:
            wait = max(0.0, min(wait, until - time.time()))
        try:
            return proc.wait(timeout=wait), status
        except subprocess.TimeoutExpired:
            pass
        if stop() or (until is not None and time.time() >= until):
            return None, status
        if time.monotonic() >= next_beat:
            claim.heartbeat()
            status = status.beat()
            write_status(cell, status)
            next_beat = time.monotonic() + heartbeat_s
            if tick is not None:
                tick()


def record_end(cell: Path, status: CellStatus, returncode: Optional[int], *, timed_out: bool = False,
               interrupted: bool = False, time_limit_warned: bool = False) -> CellStatus:
    """Write and return the cell's final status from its exit code and the files it left.

    ``timed_out``/``interrupted``: its owner stopped it (wall-clock limit; Ctrl-C or SIGTERM).
    ``time_limit_warned``: Slurm announced the job's time limit, so a kill that follows is TIMEOUT.
    A CANCELLED cell is marked interrupted: it resumes from its checkpoint when rerun. A DONE status
    records the size of ``result.json``, which every later read checks (a truncated file reads DAMAGED).
    A cell stopped at a prune request exits 0 with a partial result: PRUNED (:func:`cell_outcome`).
    """
    state, error, metrics = cell_outcome(cell, returncode, timed_out=timed_out, interrupted=interrupted)
    if time_limit_warned and state == CellState.CANCELLED:
        state, error = CellState.TIMEOUT, "time limit reached (requeue is off); rerun resumes from the checkpoint"
    status = status.finished(state, exit_code=returncode, error=error, metrics=metrics,
                             interrupted=state == CellState.CANCELLED,
                             result_size=result_size(cell) if state == CellState.DONE else None)
    write_status(cell, status)
    return status
