"""What one Slurm array task runs: one cell, in a subprocess, as the owner of the cell's status file.

submitit pickles a :class:`CellJob` (a cell folder and two settings, nothing heavy) and calls it on the
node. The job claims the cell (the submitter releases its own short claim right after ``sbatch``, so the
job may wait a moment), sets aside the files of a cell found DAMAGED (the submitter already did so for
a cell DAMAGED when it was submitted: :func:`launcher.manifest.prepare_rerun`; this is for one damaged
while its job was queued), writes ``status.json`` RUNNING with its Slurm job id, runs
``python -m <cell_module> CELL_DIR`` (:mod:`launcher.cellproc`, as a local cell: ``proxyattention.cell`` for
a trial, :mod:`launcher.taskcell` for another Hydra app's task function) with its output appended to the
cell's ``stdout.log`` / ``stderr.log`` (the same files a local cell writes), heartbeats, and writes the
final state. While it runs, the job is the only writer of ``status.json``. The cell runs with the hub offline
(``HF_HUB_OFFLINE=1``, unless the submitter's environment set it: :func:`launcher.slurm.cells_hub_offline`):
compute nodes often have no internet, and pretrained weights come from the cache filled on the login node
(a trial's cells only: another app's jobs run in the submitting environment as it is).

Why a subprocess: the trial's Python failure must end the Slurm job FAILED, never COMPLETED, and a
crash in torch must not take the status writer with it. A cell that does not end DONE (or PRUNED: a
trial stopped at a prune request, ``prune.json`` in its folder, is no failure) makes this function raise, so submitit exits non-zero and ``sacct`` says FAILED (or CANCELLED / TIMEOUT when Slurm
stopped it).

Time limit and preemption: Slurm sends ``SIGUSR2`` ``signal_delay_s`` before the limit (submitit's
``--signal``). The cell process ignores it (it would otherwise die of it); this job then
- with requeue on: interrupts the cell (SIGINT: the trial stops and keeps its last epoch checkpoint),
  records the interruption, releases the claim and lets submitit requeue the job (``checkpoint`` below);
  the requeued run resumes from ``checkpoint.pt``. After ``max_requeues`` requeues the cell is TIMEOUT.
- with requeue off: lets the cell run on; if Slurm kills it at the limit, the cell is TIMEOUT.
A cell killed by SIGTERM (``scancel``, preemption without warning) is CANCELLED and resumes on rerun.

This module imports no torch and no submitit at import time: unpickling a job on the node is instant.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Optional

from launcher import cellstate, manifest
from launcher.cellproc import CELL_MODULE, CellProcess, record_end, watch
from launcher.cellstate import REQUIRE_GPU_ENV, CellState, CellStatus, Owner
from launcher.manifest import Claim
from launcher.slurm_state import RECORD

HUB_OFFLINE_ENV = "HF_HUB_OFFLINE"  # huggingface_hub (and timm through it) then reads only its cache


class CellFailedError(RuntimeError):
    """The cell did not end DONE; raised so that the Slurm job ends FAILED. The message is its error tail."""


class CellBusyError(RuntimeError):
    """Another live owner (a second job, a local launcher) holds the cell's claim."""


def slurm_job_id() -> Optional[str]:
    """This job's id as submitit and ``sacct`` name it: ``<array job>_<task>`` for an array task."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def ignore_usr2() -> None:
    # Runs in the child process before exec: an ignored signal stays ignored across exec, so Slurm's
    # warning signal (sent to every process of the job step) does not kill the trial.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def resubmission(job: Any, *args: Any, **kwargs: Any) -> Any:
    """submitit's checkpointing protocol for a job with a ``requeue`` setting: the same job again, fresh
    (None: not requeued)."""
    if not job.requeue:
        return None
    from submitit.helpers import DelayedSubmission

    return DelayedSubmission(type(job)(**job.__getstate__()), *args, **kwargs)


def requeue_through_submitit(handler: Any) -> None:
    """Hand the time-limit signal to submitit's own handler, saved before ours replaced it: it calls the
    job's ``checkpoint()``, runs ``scontrol requeue`` and exits; or raises UncompletedJobError when the job
    timed out too often. Returns only when there is no such handler."""
    if callable(handler):
        handler(signal.SIGUSR2, None)


@dataclass
class CellJob:
    """The function a Slurm array task runs (picklable; holds only paths and settings).

    ``requeue``: checkpoint and requeue at the time-limit/preemption signal (else run until killed).
    ``claim_wait_s``: how long to wait for the submitter (or a dead run on another host) to let go of
    the cell's claim. ``stop_grace_s``: how long an interrupted cell gets to stop before SIGKILL.
    """

    cell_dir: str
    requeue: bool = True
    heartbeat_s: float = 30.0
    claim_wait_s: float = 300.0
    stop_grace_s: float = 30.0
    python: str = ""  # the interpreter for the cell; default: the one running this job
    cell_module: str = CELL_MODULE  # run as `python -m <cell_module> CELL_DIR`
    require_gpu: bool = False  # the job asked Slurm for a GPU: the cell must use it, never the CPU
    hub_offline: bool = False  # run the cell with HF_HUB_OFFLINE=1: pretrained weights from the cache only

    def __post_init__(self) -> None:
        self._signalled = False
        self._child: Optional[subprocess.Popen] = None

    def __getstate__(self) -> dict:  # pickle the settings, never a live process
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    # -- submitit's checkpointing protocol -----------------------------------------------------------

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit at the time-limit/preemption signal: resubmit this same cell.

        The cell has already been stopped and its checkpoint is on disk (see :meth:`_interrupted`);
        returning None tells submitit not to requeue.
        """
        return resubmission(self, *args, **kwargs)

    # -- the job ----------------------------------------------------------------------------------

    def __call__(self) -> dict:
        cell = Path(self.cell_dir)
        job_id = slurm_job_id()
        owner = Owner.this_process(backend="slurm", job_id=job_id)
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        signal.signal(signal.SIGUSR2, self._on_usr2)
        claim = self._claim(cell, owner)
        status = cellstate.read_status(cell)
        if status.state == CellState.DONE and cellstate.read_result(cell) is not None:
            claim.release()
            print(f"cell {cell.name} is already DONE; nothing to do", flush=True)
            return {"state": CellState.DONE.value, "skipped": True}
        if status.state == CellState.PRUNED:  # pruned by a run since it was submitted: never rerun here
            claim.release()
            print(f"cell {cell.name} is already PRUNED; nothing to do", flush=True)
            return {"state": CellState.PRUNED.value, "skipped": True}
        if status.state == CellState.DAMAGED:  # damaged since it was submitted: never run over
            try:
                moved = manifest.set_aside_damaged(cell, keep=(RECORD,))  # the record of this job stays
            except BaseException:
                claim.release()
                raise
            print(f"cell {cell.name} was DAMAGED ({cellstate.error_headline(status.error)}); its files were "
                  f"moved to {moved} and it runs from scratch", flush=True)
            status = CellStatus(attempts=status.attempts)
        status = status.started_by(owner)
        cellstate.write_status(cell, status)
        released = False
        try:
            if not self._signalled:
                status = self._run(cell, claim, status)
            if self._signalled and self.requeue and status.state == CellState.RUNNING:
                status = self._interrupted(cell, status, job_id)  # PENDING until the job runs again
                claim.release()
                released = True
                self._requeue_through_submitit(submitit_handler)  # exits (requeued) or raises
            if status.state == CellState.RUNNING:  # the USR2 came before the child started; requeue off
                status = status.finished(CellState.TIMEOUT, error="time limit reached before the cell started")
                cellstate.write_status(cell, status)
        except BaseException as e:
            if status.state == CellState.RUNNING or (released and _is_uncompleted(e)):
                status = self._final_for_exception(cell, status, e, released)
            raise
        finally:
            self._stop_child()
            if not released:
                claim.release()
        if not status.state.settled:  # DONE, or PRUNED (stopped on request: not a failure)
            raise CellFailedError(f"cell {cell.name} ended {status.state.value}:\n{status.error or ''}")
        return {"state": status.state.value, "metrics": status.metrics}

    def _on_usr2(self, signum: int, frame: Optional[FrameType]) -> None:
        # A signal handler must not wait on the child (Popen.wait is not re-entrant): only record the
        # request and ask the trial to stop; the main loop does the rest.
        self._signalled = True
        print(f"caught {signal.Signals(signum).name}: time limit or preemption near", flush=True)
        if self.requeue and self._child is not None and self._child.poll() is None:
            try:
                os.killpg(self._child.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def _claim(self, cell: Path, owner: Owner) -> Claim:
        deadline = time.monotonic() + self.claim_wait_s
        while True:
            claim = manifest.try_claim(cell, owner)
            if claim is not None:
                return claim
            if time.monotonic() > deadline:
                holder = manifest.claim_holder(cell)
                raise CellBusyError(
                    f"cell {cell} is claimed by {holder} for more than {self.claim_wait_s:.0f} s; "
                    "another launcher or job is running it. Check `python -m launcher.status` and rerun.")
            time.sleep(0.5)

    def _run(self, cell: Path, claim: Claim, status: CellStatus) -> CellStatus:
        """Run the cell process to its end (or to an interruption); return the status written."""
        # OMP_NUM_THREADS comes from the sbatch script (= cpus_per_task); GPUs from Slurm's gres.
        env = {REQUIRE_GPU_ENV: "1"} if self.require_gpu else {}
        if self.hub_offline:
            env[HUB_OFFLINE_ENV] = "1"
        proc = CellProcess(cell, module=self.cell_module, python=self.python, env=env,
                           note=f"slurm job {status.job_id}", preexec_fn=ignore_usr2)
        self._child = proc.start(status.attempts, status.host)
        status = dataclasses.replace(status, pid=self._child.pid)
        cellstate.write_status(cell, status)
        requeueing = lambda: self._signalled and self.requeue  # noqa: E731
        rc, status = watch(self._child, cell, claim, status, self.heartbeat_s, stop=requeueing)
        if requeueing() and rc != 0:
            return status  # stopped for the requeue (or died meanwhile): the main flow requeues it
        return record_end(cell, status, rc, time_limit_warned=self._signalled)

    def _stop_child(self) -> Optional[int]:
        """Stop the cell process if it still runs: SIGINT (it keeps its last checkpoint), then SIGKILL."""
        child = self._child
        if child is None or child.poll() is not None:
            return None if child is None else child.returncode
        try:
            os.killpg(child.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        try:
            return child.wait(timeout=self.stop_grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            return child.wait()

    def _interrupted(self, cell: Path, status: CellStatus, job_id: Optional[str]) -> CellStatus:
        # PENDING, not finished: Slurm requeues this same job id, so `launcher.status` keeps asking
        # Slurm about it (queued, running again) and a rerun never submits a second copy.
        rc = self._stop_child()
        status = dataclasses.replace(
            status.finished(CellState.PENDING, exit_code=rc, interrupted=True,
                            error=f"time limit or preemption: stopped at its last epoch checkpoint and "
                                  f"requeued as job {job_id}; it resumes when the job starts again"),
            heartbeat=time.time())
        cellstate.write_status(cell, status)
        return status

    @staticmethod
    def _requeue_through_submitit(handler: Any) -> None:
        requeue_through_submitit(handler)  # exits (requeued) or raises
        raise CellFailedError("time limit or preemption, and no submitit handler to requeue the job")

    def _final_for_exception(self, cell: Path, status: CellStatus, e: BaseException,
                             released: bool) -> CellStatus:
        """The status to leave when the job itself is stopped by an exception (not the cell's outcome)."""
        if isinstance(e, SystemExit) and released:
            return status  # submitit requeued the job and exits: the TIMEOUT/interrupted status stays
        rc = self._stop_child()
        if _is_uncompleted(e):
            new = status.finished(CellState.TIMEOUT, exit_code=rc,
                                  error=f"time limit: not requeued ({e}); rerun resumes from the checkpoint")
        else:
            new = status.finished(CellState.FAILED, exit_code=rc,
                                  error=f"the Slurm job's own code failed: {type(e).__name__}: {e}")
        if released:
            # The claim is gone; take it back briefly to write the final word (one writer).
            claim = manifest.try_claim(cell, Owner.this_process(backend="slurm", job_id=status.job_id))
            if claim is None:
                return status
            try:
                cellstate.write_status(cell, new)
            finally:
                claim.release()
        else:
            cellstate.write_status(cell, new)
        return new


def _is_uncompleted(e: BaseException) -> bool:
    return type(e).__name__ == "UncompletedJobError"
