"""Where a Slurm cell stands: its submission record (``slurm.json``) and Slurm's view of the job.

A cell's ``status.json`` is the word of its owner (the submitter writes PENDING with the job id while
it holds the claim; the job writes RUNNING and the end). Slurm knows what the owner could not write:
a job cancelled while queued, killed at its time limit, lost with its node. :func:`refresh_status`
merges the two for ``python -m launcher.status`` and for rerun decisions:

======================  ==============================================================
Slurm says              the cell shows
======================  ==============================================================
PENDING, REQUEUED, …    PENDING (queued as job J)
RUNNING                 RUNNING (the job's own status, heartbeat and all)
COMPLETED               the job's final status (FAILED if it never wrote one)
FAILED, OUT_OF_MEMORY   FAILED with the tail of the job's stderr log
CANCELLED               CANCELLED (rerunnable; resumes from its checkpoint)
TIMEOUT, DEADLINE       TIMEOUT
NODE_FAIL, PREEMPTED    CANCELLED, interrupted (rerunnable)
======================  ==============================================================

Job states come from ``squeue`` (live jobs, no accounting lag) and ``sacct`` (finished ones), one call
each for the whole sweep, parsed with submitit's own ``sacct`` reader.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from launcher import manifest
from proxyattention import cellstate, fileio
from proxyattention.cellstate import CellState, CellStatus

RECORD = "slurm.json"

# Slurm job states in which the job will still run (or runs): never submit a second copy.
LIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED",
                  "CONFIGURING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT"})
ENDED = {"FAILED": CellState.FAILED, "OUT_OF_MEMORY": CellState.FAILED, "BOOT_FAIL": CellState.FAILED,
         "CANCELLED": CellState.CANCELLED, "REVOKED": CellState.CANCELLED, "TIMEOUT": CellState.TIMEOUT,
         "DEADLINE": CellState.TIMEOUT, "NODE_FAIL": CellState.CANCELLED, "PREEMPTED": CellState.CANCELLED,
         "COMPLETED": CellState.FAILED}
# A job Slurm does not know (yet): accounting lags ``sbatch`` by a moment; after this, it is lost.
UNKNOWN_GRACE_S = 300.0


@dataclass
class SlurmRecord:
    """``cells/<id>/slurm.json``: the cell's latest submission. Written only by the submitter, while it
    holds the cell's claim (one writer), before the claim is released to the job."""

    job_id: str  # "<array job>_<task>", as sacct and submitit name it
    submitted: float
    submitter: str  # host:pid of the launch that submitted it
    stdout: str  # submitit's log files of this job (the cell's own output is in the cell folder)
    stderr: str
    previous_jobs: list[str] = field(default_factory=list)

    @property
    def array_job_id(self) -> str:
        return self.job_id.split("_", 1)[0]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_record(cell: Path) -> Optional[SlurmRecord]:
    d = fileio.read_json(Path(cell) / RECORD)
    if d is None:
        return None
    names = {f.name for f in dataclasses.fields(SlurmRecord)}
    try:
        return SlurmRecord(**{k: v for k, v in d.items() if k in names})
    except TypeError:
        return None


def write_record(cell: Path, record: SlurmRecord) -> None:
    fileio.write_json_atomic(Path(cell) / RECORD, record.to_dict())


def _run(cmd: list[str], timeout: float = 60.0) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def job_states(job_ids: Iterable[str]) -> dict[str, str]:
    """Slurm's state of each job id (``"123_4"``), first word only (``"CANCELLED by 0"`` → ``CANCELLED``).

    Jobs Slurm does not know are missing from the answer. Live jobs are read from ``squeue`` (the
    controller itself); the rest from ``sacct`` (the accounting database).
    """
    wanted = set(job_ids)
    if not wanted:
        return {}
    arrays = sorted({j.split("_", 1)[0] for j in wanted})
    states: dict[str, str] = {}
    # -r: one line per array task, so pending tasks are not folded into "123_[4-9%2]".
    out = _run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(arrays)])
    for line in (out or "").splitlines():
        jid, _, state = line.strip().partition("|")
        if jid in wanted and state:
            states[jid] = state.split()[0]
    rest = wanted - states.keys()
    if rest:
        from submitit.slurm.slurm import SlurmInfoWatcher

        rest_arrays = sorted({j.split("_", 1)[0] for j in rest})
        out = _run(["sacct", "-X", "-o", "JobID,State", "--parsable2", "-j", ",".join(rest_arrays)])
        if out:
            info = SlurmInfoWatcher().read_info(out)
            for jid in rest:
                state = info.get(jid, {}).get("State")
                if state:
                    states[jid] = state.split()[0]
    return states


def view(status: CellStatus, record: Optional[SlurmRecord], slurm_state: Optional[str],
         now: Optional[float] = None) -> CellStatus:
    """The cell's effective status, given its recorded status, its submission and Slurm's job state."""
    if record is None or status.state == CellState.DONE or status.backend != "slurm":
        return status
    if status.job_id not in (None, record.job_id):
        return status  # written by an earlier job than the latest submission: its word is final
    now = time.time() if now is None else now
    job = record.job_id
    if slurm_state is None:
        if now - record.submitted < UNKNOWN_GRACE_S or status.state.finished:
            return status
        return dataclasses.replace(
            status, state=CellState.CANCELLED, interrupted=True,
            error=f"Slurm has no record of job {job} (purged, or accounting is off); rerun to resume")
    if slurm_state in LIVE:
        if status.state == CellState.RUNNING:
            return status
        state = CellState.RUNNING if slurm_state == "RUNNING" else CellState.PENDING
        return dataclasses.replace(status, state=state, job_id=job)
    if status.state.finished:
        return status  # the job wrote its own end; that is more precise than Slurm's
    state = ENDED.get(slurm_state, CellState.CANCELLED)
    if slurm_state == "COMPLETED":
        error = (f"Slurm job {job} COMPLETED but the cell recorded no end; see {record.stdout}; rerun it")
    elif state == CellState.FAILED:
        error = f"Slurm job {job} {slurm_state}:\n" + (manifest.tail(Path(record.stderr))
                                                        or f"(no log at {record.stderr})")
    elif state == CellState.TIMEOUT:
        error = f"Slurm job {job} hit its time limit; rerun resumes from the last checkpoint"
    elif slurm_state in ("NODE_FAIL", "PREEMPTED"):
        error = f"Slurm job {job} {slurm_state}: rerunnable, resumes from the last checkpoint"
    else:
        error = f"Slurm job {job} {slurm_state} (scancel?); rerun resumes from the last checkpoint"
    return dataclasses.replace(status, state=state, job_id=job, error=error,
                               interrupted=state == CellState.CANCELLED)


def refresh_status(sweep_dir: Path, statuses: dict[str, CellStatus]) -> dict[str, CellStatus]:
    """``{cell_id: status}`` as Slurm sees it, for cells whose status says ``backend: slurm``.

    The hook :mod:`launcher.status` calls; one ``squeue`` and at most one ``sacct`` for all cells.
    """
    records = {}
    for cid, s in statuses.items():
        if s.backend == "slurm" and s.state != CellState.DONE:
            rec = read_record(cellstate.cell_dir(sweep_dir, cid))
            if rec is not None:
                records[cid] = rec
    states = job_states(r.job_id for r in records.values())
    now = time.time()
    out = dict(statuses)
    for cid, rec in records.items():
        out[cid] = view(statuses[cid], rec, states.get(rec.job_id), now)
    return out

