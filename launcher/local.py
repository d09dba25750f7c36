"""The local backend: each cell is its own process, a bounded pool of them, pinned to GPUs.

A cell runs as ``python -m <cell_module> CELL_DIR`` in a new session (its own process group, so
a timeout or Ctrl-C kills it and everything it started, and GPU memory is freed when it exits), with
``CUDA_VISIBLE_DEVICES`` set round-robin over the GPUs found (without importing torch: the
``CUDA_VISIBLE_DEVICES`` of the launcher, else ``nvidia-smi -L``) and ``OMP_NUM_THREADS`` set to
``cores // workers``. Its stdout/stderr go to ``stdout.log``/``stderr.log`` in the cell folder.

This process owns the claim of every cell it runs and is the only writer of their ``status.json``.
Cells claimed by another live launcher are waited on, not run twice; a claim left by a dead process
is taken over, and a cell process it left behind (orphaned by ``kill -9`` of its launcher) is killed
first, so the rerun is the only process working in that folder. Cells whose Slurm job is queued or
running are skipped, not waited for (their job runs them; they count as not DONE in the exit code):
Slurm is asked once, for the cells whose status names a Slurm job, and not at all when none does.

A DAMAGED cell (an entry that cannot be trusted: see :func:`launcher.cellstate.read_status`) is
named with the reason before anything runs; the attempt that redoes it first moves its files into
``damaged-<stamp>/``. A write that fails mid-sweep because the sweep folder or the store is full or
read-only (:data:`launcher.manifest.WRITE_ERRNOS`) ends the launch cleanly: running cells are stopped
and marked CANCELLED where the store still takes the write, the summary is printed, and the
``OSError`` is raised for the caller to say in one line; a re-issue resumes. Before any cell runs, the
folders its cells live in are checked to take a write.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import os
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from launcher import apps, cellstate, manifest, progress
from launcher.cellproc import CELL_MODULE, CellProcess, record_end, watch
from launcher.cellstate import (
    REQUIRE_GPU_ENV,
    CellState,
    CellStatus,
    Owner,
    error_headline,
)
from launcher.console import (
    Console,
    dry_run_listing,
    fmt_duration,
    fmt_result,
)
from launcher.manifest import CellRecord, Claim, Rerun
from launcher.objective import check_objective

KILL_GRACE_S = 5.0
SLURM_LINES = 20  # cells left to their Slurm job: one line each up to this many, then a count


@dataclass
class LocalOptions:
    """``hydra.launcher.*`` of ``hydra/launcher=local`` (see conf/hydra/launcher/local.yaml)."""

    workers: int = 1
    timeout_min: Optional[float] = None
    rerun: str = "not_done"
    dry_run: bool = False
    threads_per_cell: int = 0
    gpus: Optional[str] = None
    heartbeat_s: float = 10.0
    stale_after_s: float = cellstate.DEFAULT_STALE_AFTER_S
    cell_module: str = CELL_MODULE
    list_rows: int = 60
    objective: Any = None  # null: the app's (launcher.objective)
    objective_vs_baseline: bool = False
    store: Optional[str] = None  # the cell store: a dry run into a new sweep folder reads cells from it

    @classmethod
    def from_config(cls, cfg: Any) -> "LocalOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: cfg[k] for k in cfg if k in names}
        opts = cls(**kw)
        Rerun.parse(opts.rerun)
        if opts.workers < 1:
            raise ValueError(f"hydra.launcher.workers={opts.workers} must be >= 1")
        if opts.timeout_min is not None and opts.timeout_min <= 0:
            raise ValueError(f"hydra.launcher.timeout_min={opts.timeout_min} must be > 0 (or null: no limit)")
        if opts.list_rows < 0:
            raise ValueError(f"hydra.launcher.list_rows={opts.list_rows} must be >= 0 (0: every cell)")
        check_objective(opts.objective)
        return opts


def detect_gpus(spec: Optional[str] = None) -> list[str]:
    """GPU ids to pin cells to: ``spec`` ("0,1"), else ``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``."""
    if spec is not None and str(spec).strip() != "":
        return [s.strip() for s in str(spec).split(",") if s.strip()]
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [s.strip() for s in env.split(",") if s.strip() and s.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return [str(i) for i, ln in enumerate(ln for ln in out.stdout.splitlines() if ln.startswith("GPU "))]


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


_cell_process_alive = cellstate.cell_process_alive  # by its command line: the cell's real path


def stop_orphan(status: CellStatus, cell: Path) -> bool:
    """Kill the process group of a cell process left running by a dead launcher. True if it did."""
    if status.pid is None or status.host != cellstate.HOST or not _cell_process_alive(status.pid, cell):
        return False
    kill_group(status.pid, signal.SIGKILL)
    deadline = time.time() + 10
    while _cell_process_alive(status.pid, cell) and time.time() < deadline:
        time.sleep(0.05)
    return True


class LocalRunner:
    """Run the cells of a plan that the rerun mode selects; return the launcher's exit code."""

    def __init__(self, sweep_dir: Path, records: list[CellRecord], options: LocalOptions,
                 console: Optional[Console] = None, summary: bool = True, hooks: Any = None,
                 collect: Optional[dict] = None, app: Any = None) -> None:
        self.sweep_dir = Path(sweep_dir)
        self.app = app if app is not None else apps.for_records(records)
        self.summary = summary  # False: the caller prints one summary for several launches
        self.collect = collect  # filled with every cell's final status, for the caller's summary
        self._overrides = {r.id: r.overrides for r in records}
        self.hooks = hooks  # Hydra's job callbacks: .start(cell_id) before a cell runs, .end(cell_id) after
        self.records = records
        self.opts = options
        self.rerun = Rerun(options.rerun)
        self.console = console or Console(records, column=self.app.column)
        self.owner = Owner.this_process()
        self.gpus = detect_gpus(options.gpus)
        self.threads = options.threads_per_cell or max(1, cpu_count() // options.workers)
        self.statuses: dict[str, CellStatus] = {}
        self._store = manifest.store_dir(options.store)
        self._touched: set[str] = set()  # cells this launch ran or waited on: re-read at the end
        self._procs: dict[str, subprocess.Popen] = {}
        self._stopping = threading.Event()
        self._stopped = threading.Event()  # every cell process of this launch is gone (after _interrupt)
        self._lock = threading.Lock()

    def dir(self, cid: str) -> Path:
        return cellstate.cell_dir(self.sweep_dir, cid)

    def _status(self, cid: str) -> CellStatus:
        status = manifest.entry_status(manifest.cell_entry(self.sweep_dir, cid, self._store),
                                       self.opts.stale_after_s)
        if (self._stopped.is_set() and status.state == CellState.RUNNING and status.host == cellstate.HOST
                and status.owner_pid == self.owner.pid):  # stopped by this launch, its end not recorded
            status = dataclasses.replace(status, state=CellState.CANCELLED, interrupted=True, error=(
                "stopped by its launcher, which could not record it (the store took no write); rerun to resume"))
        return status

    # -- one cell, in a worker thread, while holding its claim
    def _run_cell(self, cid: str, claim: Claim, slot: int) -> CellStatus:
        cell = self.dir(cid)
        try:
            status = cellstate.read_status(cell)
            if status.state == CellState.RUNNING:
                stop_orphan(status, cell)
            fresh = manifest.prepare_rerun(cell, status, self.rerun, say=self.console.say)
            if fresh is not None:  # DAMAGED (its files set aside) or rerun=all (earlier results moved)
                status = fresh
            elif manifest.adoptable(cell):
                # Its process finished (or was pruned) after its launcher died: adopt its result.
                status = manifest.adopted(cell, status)
                cellstate.write_status(cell, status)
                return status
            return self._spawn(cid, cell, claim, status, slot)
        finally:
            claim.release()

    def _spawn(self, cid: str, cell: Path, claim: Claim, status: CellStatus, slot: int) -> CellStatus:
        env = {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
               "PROXYATTENTION_CPUS": str(self.threads)}  # the cell's loader workers follow its share
        where = "cpu"
        if self.gpus:
            gpu = self.gpus[slot % len(self.gpus)]
            env.update({"CUDA_VISIBLE_DEVICES": gpu, REQUIRE_GPU_ENV: "1"})  # pinned to a GPU: never the CPU
            where = f"gpu {gpu}"
        if self._stopping.is_set():
            return status
        manifest.write_hydra_metadata(cell, self._overrides.get(cid, []))
        proc = CellProcess(cell, module=self.opts.cell_module, env=env).start(status.attempts + 1, cellstate.HOST)
        with self._lock:
            self._procs[cid] = proc
        status = status.started_by(self.owner, pid=proc.pid)
        cellstate.write_status(cell, status)
        self.console.cell(cid, CellState.RUNNING, f"(attempt {status.attempts}, pid {proc.pid}, {where})")
        until = None if self.opts.timeout_min is None else time.time() + 60 * self.opts.timeout_min
        try:
            rc, status = watch(proc, cell, claim, status, self.opts.heartbeat_s, until=until,
                               tick=lambda: self._show_progress(cid, cell))
            timed_out = rc is None
            if timed_out:
                self._terminate(proc)
                rc, status = watch(proc, cell, claim, status, self.opts.heartbeat_s)
        except BaseException:  # a heartbeat that cannot be written: never leave the cell unsupervised
            self._terminate(proc)
            with self._lock:
                self._procs.pop(cid, None)
            try:
                record_end(cell, status, proc.wait(), interrupted=True)
            except OSError:
                pass  # the store takes no write: its status reads CANCELLED once this launcher is gone
            raise
        with self._lock:
            self._procs.pop(cid, None)
        interrupted = self._stopping.is_set() and not timed_out and rc != 0
        return record_end(cell, status, rc, timed_out=timed_out, interrupted=interrupted)

    def _show_progress(self, cid: str, cell: Path) -> None:
        """At a heartbeat: a console line when the cell has finished an epoch since the last one shown."""
        try:
            self.console.progress(cid, progress.read_progress(cell))
        except Exception:  # noqa: BLE001 (a display must never stop the cell's supervision)
            pass

    @staticmethod
    def _terminate(proc: subprocess.Popen) -> None:
        """SIGTERM the cell's process group, SIGKILL what is left after a grace period."""
        kill_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        kill_group(proc.pid, signal.SIGKILL)

    def _report(self, cid: str, status: CellStatus, note: str = "") -> None:
        self.statuses[cid] = status
        self._touched.add(cid)
        if status.state == CellState.DONE:
            column = self.app.column
            detail = f"{column[0]} {fmt_result(status, column)}  {fmt_duration(status.duration_s)}"
        else:
            detail = error_headline(status.error)
            if status.state == CellState.FAILED:
                detail += f"  (log: {self.dir(cid) / manifest.STDERR})"
        self.console.cell(cid, status.state, (note + " " + detail).strip())
        self.console.advance()

    def _leave_to_slurm(self, selected: list[str]) -> tuple[list[str], int]:
        """Drop the selected cells whose Slurm job is queued or running (their job runs them), saying so.

        Returns the rest and how many were dropped; asks Slurm only if a status names a Slurm job.
        """
        from launcher.slurm_state import in_slurm

        owned = in_slurm(self.sweep_dir, {cid: self.statuses[cid] for cid in selected
                                          if self.statuses[cid].backend == "slurm"}, self._store)
        for n, (cid, status) in enumerate(owned.items()):
            self.statuses[cid] = status
            if n < SLURM_LINES:
                where = "running" if status.state == CellState.RUNNING else "queued"
                self.console.say(f"cell {cid} is {where} in Slurm as job {status.job_id}; skipped")
        if len(owned) > SLURM_LINES:
            self.console.say(f"… and {len(owned) - SLURM_LINES} more cells queued or running in Slurm; skipped "
                             f"(python -m launcher.status {self.sweep_dir})")
        return [cid for cid in selected if cid not in owned], len(owned)

    def _check_writable(self, selected: list[str]) -> None:
        """Raise the ``OSError`` of a folder the selected cells live in that takes no write (a full or
        read-only sweep folder or store), before any cell is claimed."""
        folders = {os.path.dirname(os.path.realpath(self.dir(cid))) for cid in selected}
        for folder in sorted(folders):
            manifest.check_writable(Path(folder))

    # -- the pool
    def run(self) -> int:
        ids = [r.id for r in self.records]
        for cid in ids:
            self.statuses[cid] = self._status(cid)
        manifest.say_damaged(self.console, ids, self.statuses, self.sweep_dir, SLURM_LINES)
        selected = [cid for cid in ids if self.rerun.wants(self.statuses[cid].state)]
        selected, in_slurm = self._leave_to_slurm(selected)
        if self.opts.dry_run:
            return self._dry_run(selected)
        if not selected:
            n_done = sum(s.state == CellState.DONE for s in self.statuses.values())
            n_pruned = sum(s.state == CellState.PRUNED for s in self.statuses.values())
            if n_done == len(ids):
                self.console.say(f"All {len(ids)} cells are DONE; nothing to run.")
            elif n_done + n_pruned == len(ids):
                self.console.say(f"All {len(ids)} cells are finished ({n_done} DONE, {n_pruned} PRUNED); "
                                 "nothing to run.")
            elif in_slurm:
                self.console.say(f"Nothing to run here: {in_slurm} cells are queued or running in Slurm.")
            else:
                self.console.say(f"No cell matches hydra.launcher.rerun={self.rerun.value}; nothing to run.")
            return self._finish()
        self._check_writable(selected)
        self._touched.update(selected)
        skipped = len(ids) - len(selected)
        gpu_note = f"GPUs {','.join(self.gpus)}" if self.gpus else "no GPU"
        self.console.say(f"{len(selected)} of {len(ids)} cells to run ({skipped} skipped), "
                         f"{self.opts.workers} at a time, {self.threads} threads each, {gpu_note}; "
                         f"sweep folder: {self.sweep_dir}")
        self.console.start_progress(len(selected))
        main = threading.current_thread() is threading.main_thread()
        old_term = signal.signal(signal.SIGTERM, _raise_interrupt) if main else None
        old_int = signal.getsignal(signal.SIGINT) if main else None
        self._pool = cf.ThreadPoolExecutor(max_workers=self.opts.workers, thread_name_prefix="cell")
        try:
            self._loop(selected)
            self._pool.shutdown(wait=True)
        except KeyboardInterrupt:
            self._interrupt()
            self.console.close()
            self.console.say("Interrupted: running cells were stopped and marked CANCELLED; "
                             "run the same command again to resume them.")
            self._finish()
            return 130
        except OSError as e:
            if not manifest.is_write_failure(e):
                self._interrupt()
                raise
            self._interrupt()
            self.console.close()
            self.console.say(f"Stopped: a write failed ({e.strerror or e}); running cells were stopped and "
                             "marked CANCELLED where the store still took the write; queued cells did not "
                             "start.")
            self._finish()
            raise
        except BaseException:
            self._interrupt()  # whatever went wrong, no cell keeps running unsupervised
            raise
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
            if old_int is not None:
                signal.signal(signal.SIGINT, old_int)
        self.console.close()
        return self._finish()

    def _loop(self, selected: list[str]) -> None:
        pending = deque(selected)
        waiting: dict[str, float] = {}  # held by another live owner: cell -> when last looked at
        running: dict[cf.Future, tuple[str, int]] = {}
        free_slots = list(range(self.opts.workers))
        while pending or running or waiting:
            while pending and free_slots:
                cid = pending.popleft()
                claim = manifest.try_claim(self.dir(cid), self.owner, self.opts.stale_after_s)
                if claim is None:
                    if cid not in waiting:
                        self.console.cell(cid, CellState.RUNNING, "(held by another launcher; waiting for it)")
                    waiting[cid] = time.time()
                    continue
                status = self._status(cid)  # re-read under the claim
                ran_elsewhere = (status.attempts > self.statuses[cid].attempts and status.state.finished
                                 and not status.interrupted)
                submitted_since = (status.backend == "slurm" and not status.state.finished
                                   and status.job_id != self.statuses[cid].job_id)  # a Slurm job runs it
                if ran_elsewhere or submitted_since or not self.rerun.wants(status.state):
                    # Another launcher ran it since this launch looked: never run a cell twice.
                    claim.release()
                    waiting.pop(cid, None)
                    self._report(cid, status, "(by another launcher)")
                    continue
                waiting.pop(cid, None)
                slot = free_slots.pop(0)
                if self.hooks is not None:
                    self.hooks.start(cid)
                running[self._pool.submit(self._run_cell, cid, claim, slot)] = (cid, slot)
            if running:
                done, _ = cf.wait(list(running), timeout=0.5, return_when=cf.FIRST_COMPLETED)
            else:
                done = set()
                time.sleep(0.5)
            for fut in done:
                cid, slot = running.pop(fut)
                free_slots.append(slot)
                free_slots.sort()
                self._report(cid, fut.result())
                if self.hooks is not None:
                    self.hooks.end(cid)
            now = time.time()
            for cid, seen in list(waiting.items()):
                if now - seen < 1.0 or cid in pending:
                    continue
                waiting[cid] = now
                status = self._status(cid)
                if status.state.finished and not status.interrupted:
                    waiting.pop(cid)
                    self._report(cid, status, "(by another launcher)")
                elif manifest.claim_holder(self.dir(cid), self.opts.stale_after_s) is None:
                    pending.append(cid)  # its owner is gone: take it over

    def _interrupt(self) -> None:
        """Ctrl-C / SIGTERM: stop every running cell's process group; workers record CANCELLED.

        The cells get ``KILL_GRACE_S`` to stop on SIGTERM; a second Ctrl-C (or SIGTERM) meanwhile kills
        them at once (SIGKILL) instead of raising here."""
        self._stopping.set()
        with self._lock:
            running = list(self._procs)
            procs = list(self._procs.values())
        hurried = threading.Event()

        def kill_now(signum: int, frame: Any) -> None:
            hurried.set()
            for p in list(self._procs.values()) + procs:
                kill_group(p.pid, signal.SIGKILL)

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, kill_now)
            signal.signal(signal.SIGTERM, kill_now)
        for p in procs:
            kill_group(p.pid, signal.SIGTERM)
        deadline = time.time() + KILL_GRACE_S
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            kill_group(p.pid, signal.SIGKILL)
        # The worker threads now see their processes end and write CANCELLED (interrupted).
        self._pool.shutdown(wait=True)
        self._stopped.set()
        if hurried.is_set():
            self.console.say("Interrupted again: the running cells were killed at once.")
        for cid in running:
            status = self._status(cid)
            self.console.cell(cid, status.state, error_headline(status.error))

    def _finish(self) -> int:
        for cid in self._touched:
            self.statuses[cid] = self._status(cid)
        if self.collect is not None:
            self.collect.update(self.statuses)
        if self.summary:
            self.console.summary(self.records, self.statuses, self.sweep_dir)
        # PRUNED cells were stopped on request: not failures.
        return 0 if all(s.state.settled for s in self.statuses.values()) else 1

    def _dry_run(self, selected: list[str]) -> int:
        self.console.say(dry_run_listing(self.console, self.records, self.statuses, selected, self.opts.list_rows))
        lines = self.app.dry_run_estimate(self.sweep_dir, selected, self.opts.store, gpu=local_gpu(self.gpus),
                                          timeout_min=self.opts.timeout_min)
        if lines:
            self.console.say(lines)
        self.console.say(f"\ndry run: {len(selected)} of {len(self.records)} cells would run "
                         f"(hydra.launcher.rerun={self.rerun.value}); sweep folder: {self.sweep_dir}")
        return 0


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def check_options(launcher_cfg: Any, adaptive: bool = False) -> None:
    """Raise ``ValueError`` naming the ``hydra.launcher`` key whose value cannot run (any sweeper can
    drive this backend: it returns each batch's results)."""
    LocalOptions.from_config(launcher_cfg)


def local_gpu(gpus: Iterable[str]) -> Optional[str]:
    """How a local cell gets a GPU: the GPUs the pool pins cells to, or None."""
    found = list(gpus)
    return f"GPUs {','.join(found)} found" if found else None


def run(sweep_dir: Path, records: list[CellRecord], launcher_cfg: Any, summary: bool = True,
        hooks: Any = None, collect: Optional[dict] = None, app: Any = None) -> int:
    """Backend entry point used by :mod:`launcher.plugin`: run the plan's cells, return the exit code.

    ``summary=False`` leaves the summary table to the caller, who may pass ``collect`` (a dict) to get
    every cell's final status; ``hooks`` get ``start(cell_id)`` before and ``end(cell_id)`` after each
    cell this launch runs (Hydra's job callbacks); ``app`` (:class:`launcher.apps.App`) adds its lines to
    a dry run (e.g. a time estimate)."""
    return LocalRunner(sweep_dir, records, LocalOptions.from_config(launcher_cfg), summary=summary,
                       hooks=hooks, collect=collect, app=app).run()
