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
COMPLETED               the job's final status: DONE, PRUNED (FAILED if it never wrote one)
FAILED                  FAILED with the tail of the job's stderr log
OUT_OF_MEMORY           FAILED: the job went over its memory limit (``--mem``), the tail, and the fix
                        (also FAILED whose stderr has slurmstepd's ``oom_kill`` line)
CANCELLED               CANCELLED (rerunnable; resumes from its checkpoint)
TIMEOUT, DEADLINE       TIMEOUT
NODE_FAIL, PREEMPTED    CANCELLED, interrupted (rerunnable)
======================  ==============================================================

Job states come from ``squeue`` (live jobs, no accounting lag) and ``sacct`` (finished ones), one call
each for the whole sweep (``sacct`` only for the jobs ``squeue`` no longer lists). Another backend asks
:func:`in_slurm` which of its cells a Slurm job still owns (queued or running), so that a local launch
never runs such a cell a second time.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from launcher import fileio, manifest
from launcher.cellstate import CellState, CellStatus

RECORD = "slurm.json"

# Slurm job states in which the job will still run (or runs): never submit a second copy.
LIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SUSPENDED",
                  "CONFIGURING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT"})
ENDED = {"FAILED": CellState.FAILED, "OUT_OF_MEMORY": CellState.FAILED, "BOOT_FAIL": CellState.FAILED,
         "CANCELLED": CellState.CANCELLED, "REVOKED": CellState.CANCELLED, "TIMEOUT": CellState.TIMEOUT,
         "DEADLINE": CellState.TIMEOUT, "NODE_FAIL": CellState.CANCELLED, "PREEMPTED": CellState.CANCELLED,
         "COMPLETED": CellState.FAILED}
# What a cell killed for memory needs: the job's own limit raised, or fewer images held in memory.
OOM_FIX = ("fix: raise hydra.launcher.mem_gb (the job's --mem), or hold fewer images in host memory: lower "
           "dataset.max_memory_mb or set dataset.in_memory=no; then re-issue the sweep command (rerun resumes "
           "from the last checkpoint)")
# slurmstepd's word in a job's stderr when the cgroup killed a task (older Slurm then says FAILED):
# "error: Detected 1 oom_kill event in StepId=…" / "oom-kill event(s)".
OOM_KILL = re.compile(r"oom[-_]kill", re.IGNORECASE)
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


def read_record(cell: Path | str) -> Optional[SlurmRecord]:
    d = fileio.read_json(os.path.join(cell, RECORD))
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


def _task_ids(job_id: str) -> list[str]:
    """The task ids a ``sacct`` JobID names: ``123_4``; ``123``; ``123_[0-3,7%2]`` (tasks that never
    started, folded) → ``123_0`` … ``123_3``, ``123_7``."""
    m = re.fullmatch(r"(\d+)_\[([\d,\-]+)(?:%\d+)?\]", job_id)
    if m is None:
        return [job_id]
    array, spans = m.groups()
    ids = []
    for span in spans.split(","):
        first, _, last = span.partition("-")
        ids += [f"{array}_{t}" for t in range(int(first), int(last or first) + 1)]
    return ids


def job_states(job_ids: Iterable[str]) -> dict[str, str]:
    """Slurm's state of each job id (``"123_4"``), first word only (``"CANCELLED by 0"`` → ``CANCELLED``).

    Jobs Slurm does not know are missing from the answer. Live jobs are read from ``squeue`` (the
    controller itself); the rest from ``sacct`` (the accounting database), one call each.
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
        rest_arrays = sorted({j.split("_", 1)[0] for j in rest})
        out = _run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(rest_arrays)])
        for line in (out or "").splitlines():
            jid, _, state = line.strip().partition("|")
            if not state or "." in jid:
                continue
            for task in _task_ids(jid):
                if task in rest:
                    states[task] = state.split()[0]
    return states


def live_arrays(array_ids: Iterable[str]) -> set[str]:
    """The arrays (or plain jobs) among ``array_ids`` that still have a task queued or running."""
    wanted = {str(a) for a in array_ids}
    if not wanted:
        return set()
    out = _run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(sorted(wanted))])
    live = set()
    for line in (out or "").splitlines():
        jid, _, state = line.strip().partition("|")
        if state.split()[:1] and state.split()[0] in LIVE:
            live.add(jid.split("_", 1)[0])
    return live & wanted


def _live(status: CellStatus, job: str, slurm_state: str) -> CellStatus:
    """The status of a cell whose job ``job`` Slurm says is queued or running (``slurm_state`` in LIVE)."""
    if status.state == CellState.RUNNING:
        return status  # the job's own word, heartbeat and all
    state = CellState.RUNNING if slurm_state == "RUNNING" else CellState.PENDING
    if status.state == state and status.job_id == job:
        return status
    return dataclasses.replace(status, state=state, job_id=job)


def view(status: CellStatus, record: Optional[SlurmRecord], slurm_state: Optional[str],
         now: Optional[float] = None) -> CellStatus:
    """The cell's effective status, given its recorded status, its submission and Slurm's job state."""
    if record is None or status.state.settled or status.backend != "slurm":
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
        return _live(status, job, slurm_state)
    if status.state.finished:
        return status  # the job wrote its own end; that is more precise than Slurm's
    state = ENDED.get(slurm_state, CellState.CANCELLED)
    if slurm_state == "COMPLETED":
        error = (f"Slurm job {job} COMPLETED but the cell recorded no end; see {record.stdout}; rerun it")
    elif state == CellState.FAILED:
        tail = manifest.tail(Path(record.stderr)) or f"(no log at {record.stderr})"
        if slurm_state == "OUT_OF_MEMORY" or OOM_KILL.search(tail):
            # Killed by the job's memory cgroup: the cell could write nothing, so the cause and the fix
            # are said here, first (the one-line headline) and last (where the status listing shows it).
            error = (f"Slurm job {job} {slurm_state}: it exceeded its Slurm memory limit (--mem) and was "
                     f"killed; raise hydra.launcher.mem_gb or set dataset.in_memory=no\n{tail}\n{OOM_FIX}")
        else:
            error = f"Slurm job {job} {slurm_state}:\n{tail}"
    elif state == CellState.TIMEOUT:
        error = f"Slurm job {job} hit its time limit; rerun resumes from the last checkpoint"
    elif slurm_state in ("NODE_FAIL", "PREEMPTED"):
        error = f"Slurm job {job} {slurm_state}: rerunnable, resumes from the last checkpoint"
    else:
        error = f"Slurm job {job} {slurm_state} (scancel?); rerun resumes from the last checkpoint"
    return dataclasses.replace(status, state=state, job_id=job, error=error,
                               interrupted=state == CellState.CANCELLED)


def _views(sweep_dir: Path, statuses: dict[str, CellStatus],
           store: Optional[str] = None) -> dict[str, tuple[CellStatus, Optional[str], str]]:
    """``{cell_id: (status as Slurm sees it, Slurm's state of the cell's latest job, that job's id)}`` for
    the cells whose status names a Slurm job and is neither DONE nor PRUNED.

    Slurm is asked about the job each status names (the submitter records a job before it writes the
    status naming it); a cell's ``slurm.json`` is read only when that job is not queued or running —
    for its log files, its submission time, or a later job it names (then asked about too). It is read
    where the cell's status was (:func:`launcher.manifest.cell_entry`: the store's entry of a cell the
    sweep folder does not link yet, given ``store``).
    """
    mine = {cid: s for cid, s in statuses.items() if s.backend == "slurm" and not s.state.settled}
    asked = {s.job_id for s in mine.values() if s.job_id}
    states = job_states(asked)
    views: dict[str, tuple[CellStatus, Optional[str], str]] = {}
    records: dict[str, SlurmRecord] = {}
    for cid, s in mine.items():
        state = states.get(s.job_id) if s.job_id else None
        if s.job_id and state in LIVE:
            views[cid] = (_live(s, s.job_id, state), state, s.job_id)
            continue
        rec = read_record(manifest.cell_entry(sweep_dir, cid, store))
        if rec is not None:
            records[cid] = rec
    later = {r.job_id for r in records.values()} - asked
    if later:
        states.update(job_states(later))
    now = time.time()
    for cid, rec in records.items():
        state = states.get(rec.job_id)
        views[cid] = (view(mine[cid], rec, state, now), state, rec.job_id)
    return views


def refresh_status(sweep_dir: Path, statuses: dict[str, CellStatus],
                   store: Optional[str] = None) -> dict[str, CellStatus]:
    """``{cell_id: status}`` as Slurm sees it, for cells whose status says ``backend: slurm``.

    The hook :mod:`launcher.status` calls; one ``squeue`` and at most one ``sacct`` for all cells.
    ``store``: where cells the sweep folder does not link are read (a dry run into a new sweep folder).
    """
    out = dict(statuses)
    out.update({cid: seen for cid, (seen, _, _) in _views(sweep_dir, statuses, store).items()})
    return out


def in_slurm(sweep_dir: Path, statuses: dict[str, CellStatus],
             store: Optional[str] = None) -> dict[str, CellStatus]:
    """The cells among ``statuses`` that a Slurm job still owns, as Slurm sees them (PENDING or RUNNING
    with the job id): their job is queued or running, or was submitted a moment ago.

    Asks Slurm nothing unless some status says ``backend: slurm`` (one ``squeue``, at most one ``sacct``).
    """
    if not any(s.backend == "slurm" for s in statuses.values()):
        return {}
    owned = {}
    for cid, (seen, state, job) in _views(sweep_dir, statuses, store).items():
        if state in LIVE or (state is None and not seen.state.finished and seen.job_id == job):
            owned[cid] = seen if seen.job_id == job else dataclasses.replace(seen, job_id=job)
    return owned
