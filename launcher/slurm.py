"""The Slurm backend: submit the cells that need to run as job arrays through submitit, and return.

``python -m launcher -m hydra/launcher=slurm …`` plans the cells like the local launcher, then
:func:`run` here:

1. reads every cell's state (its ``status.json`` refreshed from ``squeue``/``sacct``,
   :mod:`launcher.slurm_state`), names each DAMAGED cell with the reason, and selects the cells
   ``hydra.launcher.rerun`` asks for; a dry run reads the cells as the local backend does
   (:func:`launcher.manifest.cell_entry`: a new sweep folder's cells from the store), so a cell DONE in
   the store is never listed as one to submit;
2. claims each selected cell (the manifest's exclusive claim files: of two launchers issued at once,
   one gets each cell) and, under the claim, skips a cell that is DONE or whose latest job is still
   queued or running — never a second copy of a live job; still under the claim, before ``sbatch``, a
   DAMAGED cell's files are moved into ``damaged-<stamp>/`` (and with ``rerun=all`` earlier results into
   ``previous/<stamp>/``), as the local backend does (:func:`launcher.manifest.prepare_rerun`), so no
   job reads or writes over an entry that cannot be trusted;
3. submits the rest as job arrays laid out in *lanes* (below), each array below the cluster's
   ``MaxArraySize``; each task runs :class:`launcher.slurm_job.CellJob` on its node;
4. right after each array's ``sbatch``, writes its cells' ``slurm.json`` (job id, log files) and a
   PENDING ``status.json`` naming the job, and releases their claims (the job claims its cell when it
   starts, so a task that starts at once never waits for the later arrays); prints the job ids, returns.

Nothing stays alive on the login node. ``python -m launcher.status SWEEP_DIR`` shows what Slurm says.
With ``hydra.launcher.wait=true`` the command instead stays until every cell it submitted or found queued
or running has ended (a look at ``squeue``/``sacct`` every ``poll_s`` seconds, :meth:`SlurmSubmitter.wait`),
then prints the summary and hands the results back, as the local backend does; Ctrl-C stops the waiting,
never the jobs. The cells are any app's (``cell_module``: the trials' ``proxyattention.cell``, or
:mod:`launcher.taskcell` for another Hydra app's task function).
An Optuna study (``hydra/sweeper=optuna``, e.g. ``+sweep=optuna_proxy``) is not planned here: its sweeper
submits worker jobs that ask, run and tell on the shared study themselves (:mod:`launcher.optuna_worker`,
:func:`launcher.optuna_worker.submit_workers`: one array of ``hydra.launcher.workers`` jobs with these
same options, ``timeout_min`` being each worker's time limit, at most ``array_parallelism`` at once).
The options are :class:`SlurmOptions` (``hydra.launcher.*``, profiles in ``conf/hydra/launcher/``).

**The cap.** ``array_parallelism`` bounds the cells of one submit command running at once, over all its
arrays. Slurm throttles only inside an array (``--array=…%N``) and no daemon is left to hand slots from
one array to the next, so the cap's slots are split into *lanes* (:func:`array_layout`): ``L`` lanes, the
fewest (at most the cap) whose shares fit one array each, lane ``l`` owning ``p_l`` slots, ``Σ p_l =
cap``. Cell ``i`` of the submission goes to the lane owning slot ``i mod cap``, so every lane gets a
share proportional to its slots and the same mix of the grid. A lane's cells are one array with
``%p_l``, or — only when the cap is smaller than the number of arrays the sweep needs — several arrays,
each ``--dependency=afterany:`` the lane's previous one. One array per lane runs at a time, so at most
``Σ p_l = cap`` cells run; a sweep that fits one array is one array with ``%cap``, as before.
Why this layout: inside a lane Slurm refills a slot the moment a cell ends, whatever the cells'
durations, and lanes never wait for each other (a long or requeued cell holds only its own slot).
Splitting the cap over contiguous chunks (``cap // A`` each) loses slots to rounding and cannot go below
one slot per array; chaining whole arrays one after another makes every boundary a barrier for all
slots. The cost that remains: a lane that ends first leaves its slots idle for the rest of the sweep
(the lanes hold equal mixes, so this is the spread of the last cells' end times), and a chained
lane idles while its array's last cells finish. The cap holds per submit command (the batches of one
command continue the same lanes); a re-issue while earlier arrays still run submits only cells that
are neither DONE nor queued, under a cap of its own.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from launcher import apps, cellstate, manifest
from launcher.cellproc import CELL_MODULE
from launcher.cellstate import CellState, CellStatus, Owner
from launcher.manifest import CellRecord, Claim, Rerun
from launcher.objective import check_objective
from launcher.slurm_state import (
    LIVE,
    SlurmRecord,
    job_states,
    live_arrays,
    read_record,
    refresh_status,
    write_record,
)

__all__ = ["SlurmOptions", "SlurmLauncherConf", "register_configs", "run", "refresh_status",
           "sbatch_parameters", "sbatch_script", "max_array_size", "array_layout", "ArrayPlan"]

SUBMITIT_DIR = "slurm"  # SWEEP_DIR/slurm: submitit's sbatch scripts, pickles and per-job logs
DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's own default when `scontrol show config` cannot be read
DAMAGED_LINES = 20  # DAMAGED cells named one line each up to this many, then a count
COUNTS_EVERY_S = 60.0  # while waiting: a line of counts when they change, at most this often


@dataclass
class SlurmOptions:
    """``hydra.launcher.*`` of ``hydra/launcher=slurm`` / ``slurm_v100`` (see conf/hydra/launcher/slurm.yaml).

    Resources are per cell: each array task is one cell on one node.
    """

    rerun: str = "not_done"  # not_done | failed (FAILED/TIMEOUT/CANCELLED/DAMAGED) | damaged | all (force)
    dry_run: bool = False  # list the cells, which would be submitted, and the sbatch script
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    timeout_min: int = 60  # --time of each cell's job
    cpus_per_task: int = 2
    mem_gb: Optional[float] = None
    gpus_per_node: Optional[int] = None
    gres: Optional[str] = None  # e.g. "gpu:v100:1"
    constraint: Optional[str] = None
    exclude: Optional[str] = None
    job_name: str = "cells"
    array_parallelism: int = 64  # at most this many cells of one submit run at once, over all its arrays
    max_array_size: Optional[int] = None  # null: the cluster's MaxArraySize (scontrol show config)
    requeue: bool = True  # at the time limit or preemption: checkpoint, requeue, resume
    max_requeues: int = 3  # time-limit requeues per job before the cell is TIMEOUT
    signal_delay_s: int = 120  # Slurm warns the job this long before its time limit (SIGUSR2)
    setup: List[str] = field(default_factory=list)  # shell lines run before the cell, e.g. module load python/3.11
    additional_parameters: Dict[str, Any] = field(default_factory=dict)  # any other sbatch option
    srun_args: List[str] = field(default_factory=list)
    python: Optional[str] = None  # interpreter on the nodes; null: the one running the launcher
    heartbeat_s: float = 30.0
    stale_after_s: float = cellstate.DEFAULT_STALE_AFTER_S
    claim_wait_s: float = 300.0  # how long a starting job waits for the cell's claim
    cell_module: str = CELL_MODULE  # run as `python -m <cell_module> CELL_DIR`
    store: Optional[str] = None  # the cell store (the planner links cells from it; a dry run reads it)
    list_rows: int = 60  # rows of a dry run's listing (0: every cell)
    objective: Any = None  # what a job returns to an adaptive sweeper (launcher.objective; null: the app's)
    objective_vs_baseline: bool = False
    # An Optuna study (hydra/sweeper=optuna): how many worker jobs loop ask, run a cell, tell on it
    # (hydra.sweeper.n_jobs wins when set); timeout_min is then each worker's --time (launcher.optuna_worker).
    workers: int = 1
    # true: after submitting, wait until every cell of the launch that a Slurm job owns has ended (asking
    # squeue/sacct every poll_s seconds), print the summary and hand back each job's result (run()).
    wait: bool = False
    poll_s: float = 15.0

    @property
    def wants_gpu(self) -> bool:
        """The jobs ask Slurm for a GPU (gres or gpus_per_node): their cells must not fall back to the CPU."""
        return bool(self.gpus_per_node) or "gpu" in str(self.gres or "")

    @classmethod
    def from_config(cls, cfg: Any) -> "SlurmOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        for k in cfg:
            if k in names:
                v = cfg[k]
                if hasattr(v, "items"):
                    v = {str(a): b for a, b in v.items()}
                elif isinstance(v, (list, tuple)) or type(v).__name__ == "ListConfig":
                    v = [str(x) for x in v]
                kw[k] = v
        opts = cls(**kw)
        Rerun.parse(opts.rerun)
        for name in ("timeout_min", "cpus_per_task", "array_parallelism", "workers"):
            if getattr(opts, name) < 1:
                raise ValueError(f"hydra.launcher.{name}={getattr(opts, name)} must be >= 1")
        if opts.max_array_size is not None and opts.max_array_size < 1:
            raise ValueError(f"hydra.launcher.max_array_size={opts.max_array_size} must be >= 1 (or null)")
        if not opts.poll_s > 0:
            raise ValueError(f"hydra.launcher.poll_s={opts.poll_s} must be > 0 (seconds between two looks at "
                             "the queue while hydra.launcher.wait=true)")
        if opts.list_rows < 0:
            raise ValueError(f"hydra.launcher.list_rows={opts.list_rows} must be >= 0 (0: every cell)")
        check_objective(opts.objective)
        if opts.signal_delay_s >= 60 * opts.timeout_min:
            raise ValueError(f"hydra.launcher.signal_delay_s={opts.signal_delay_s} must be shorter than the "
                             f"time limit ({opts.timeout_min} min)")
        return opts


@dataclass
class SlurmLauncherConf(SlurmOptions):
    """The Hydra schema of ``hydra/launcher=slurm`` (typos in ``hydra.launcher.*`` are errors)."""

    _target_: str = "hydra_plugins.proxyattention_launcher.SlurmLauncher"


def env_true(env: Mapping[str, str], *names: str) -> bool:
    """Whether the first of ``names`` set in ``env`` is true, as huggingface_hub reads a boolean variable."""
    value = next((env[n] for n in names if env.get(n)), None)
    return value is not None and value.upper() in ("1", "ON", "YES", "TRUE")


def cells_hub_offline(env: Optional[Mapping[str, str]] = None) -> bool:
    """Whether Slurm cells run with ``HF_HUB_OFFLINE=1``: yes, unless the submitting environment sets
    ``HF_HUB_OFFLINE`` itself (``HF_HUB_OFFLINE=0 python -m launcher ...`` lets cells download weights,
    on a cluster whose nodes have internet). Weights come from the cache, filled on the login node with
    ``python -m proxyattention.data weights``; a cell never waits on a network the node does not have."""
    e = os.environ if env is None else env
    return e.get("HF_HUB_OFFLINE") is None or env_true(e, "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="hydra/launcher", name="slurm_schema", node=SlurmLauncherConf,
                                 provider="launcher")


# ---------------------------------------------------------------------------------------------------
# sbatch


def sbatch_parameters(opts: SlurmOptions, parallelism: Optional[int] = None, after: Optional[str] = None) -> dict:
    """The parameters of submitit's ``SlurmExecutor.update_parameters`` for one array of cells.

    ``parallelism``: the array's ``%N`` (default: the whole cap); ``after``: the job id of the array it
    waits for (``--dependency=afterany:``, added to a dependency of ``additional_parameters``).
    """
    params: dict[str, Any] = {
        "job_name": opts.job_name,
        "time": int(opts.timeout_min),
        "nodes": 1,
        "ntasks_per_node": 1,
        "cpus_per_task": int(opts.cpus_per_task),
        "signal_delay_s": int(opts.signal_delay_s),
        "array_parallelism": int(parallelism or opts.array_parallelism),
    }
    optional = {"partition": opts.partition, "account": opts.account, "qos": opts.qos, "gres": opts.gres,
                "gpus_per_node": opts.gpus_per_node, "constraint": opts.constraint, "exclude": opts.exclude}
    params.update({k: v for k, v in optional.items() if v is not None})
    if opts.mem_gb is not None:
        mem = float(opts.mem_gb)
        params["mem"] = f"{int(mem)}GB" if mem == int(mem) else f"{int(mem * 1024)}MB"
    # The cell's threads follow its CPUs (torch would otherwise use every core of a shared node).
    setup = [f"export OMP_NUM_THREADS={int(opts.cpus_per_task)} MKL_NUM_THREADS={int(opts.cpus_per_task)}"]
    params["setup"] = setup + list(opts.setup)
    extra = dict(opts.additional_parameters)
    if opts.requeue:
        extra.setdefault("requeue", True)  # allowed to be requeued even where JobRequeue=0
    if after is not None:
        extra["dependency"] = ",".join(d for d in (extra.get("dependency"), f"afterany:{after}") if d)
    params["additional_parameters"] = extra  # always: an executor reused for the next array keeps no stale one
    if opts.srun_args:
        params["srun_args"] = list(opts.srun_args)
    return params


def sbatch_script(opts: SlurmOptions, folder: Path, map_count: Optional[int] = None, python: str = "python",
                  parallelism: Optional[int] = None, after: Optional[str] = None) -> str:
    """The sbatch script submitit writes for these options (an array of ``map_count`` cells)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{python} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(command=command, folder=folder, map_count=map_count,
                               **sbatch_parameters(opts, parallelism, after))


def max_array_size() -> int:
    """The cluster's ``MaxArraySize`` (an array holds at most this many tasks, indices 0..N-1)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return DEFAULT_MAX_ARRAY_SIZE
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
    return int(m.group(1)) if m else DEFAULT_MAX_ARRAY_SIZE


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# ---------------------------------------------------------------------------------------------------
# The layout: lanes of arrays under one cap (see the module docstring)


@dataclass(frozen=True)
class ArrayPlan:
    """One array of a submission: its cells (positions in the submitted list), its ``%N``, its lane,
    and the array it waits for (``afterany``; an index into the layout, None: it may start at once)."""

    lane: int
    cells: tuple[int, ...]
    parallelism: int
    after: Optional[int] = None


def lane_slots(cap: int, lanes: int) -> list[int]:
    """The cap's slots dealt to ``lanes`` lanes as evenly as possible; they sum to ``cap``."""
    return [cap // lanes + (1 if lane < cap % lanes else 0) for lane in range(lanes)]


def lane_sizes(n_cells: int, cap: int, lanes: int) -> list[int]:
    """How many of ``n_cells`` cells each lane gets when cell ``i`` goes to the lane owning slot ``i mod cap``."""
    sizes, slot = [], 0
    for p in lane_slots(cap, lanes):
        sizes.append(sum(n_cells // cap + (1 if s < n_cells % cap else 0) for s in range(slot, slot + p)))
        slot += p
    return sizes


def lane_count(n_cells: int, cap: int, max_size: int) -> int:
    """The fewest lanes (at most ``cap``) whose shares of ``n_cells`` fit one array of ``max_size`` each."""
    if n_cells == 0:
        return 0
    for lanes in range(min(cap, -(-n_cells // max_size)), cap + 1):
        if max(lane_sizes(n_cells, cap, lanes)) <= max_size:
            return lanes
    return cap


def array_layout(n_cells: int, cap: int, max_size: int, lanes: Optional[int] = None) -> list[ArrayPlan]:
    """The arrays that run ``n_cells`` cells with at most ``cap`` at once, each at most ``max_size`` long.

    ``lanes``: keep this many lanes (a later batch of the same command continues the earlier lanes);
    default :func:`lane_count`. Arrays come in submission order: each after the one it waits for.
    """
    if n_cells == 0:
        return []
    lanes = min(lanes or lane_count(n_cells, cap, max_size), cap)
    slots = lane_slots(cap, lanes)
    slot_lane = [lane for lane, p in enumerate(slots) for _ in range(p)]
    members: list[list[int]] = [[] for _ in range(lanes)]
    for i in range(n_cells):
        members[slot_lane[i % cap]].append(i)
    per_lane = [chunks(m, max_size) for m in members]
    layout: list[ArrayPlan] = []
    previous: list[Optional[int]] = [None] * lanes
    for round_ in range(max(len(c) for c in per_lane)):
        for lane, parts in enumerate(per_lane):
            if round_ < len(parts):
                layout.append(ArrayPlan(lane, tuple(parts[round_]), slots[lane], previous[lane]))
                previous[lane] = len(layout) - 1
    return layout


def describe_layout(layout: list[ArrayPlan]) -> str:
    """One line per lane: its arrays' sizes and ``%N``, in the order they run."""
    lanes: dict[int, list[str]] = {}
    for a in layout:
        lanes.setdefault(a.lane, []).append(f"({len(a.cells)} cell{'s' if len(a.cells) > 1 else ''}, "
                                            f"%{a.parallelism})")
    return "\n".join(f"  lane {lane + 1}: " + " then ".join(arrays) for lane, arrays in sorted(lanes.items()))


# The lanes each submit command left, per (sweep folder, cap): the last array of every lane. A later
# batch of the same command (a batching sweeper) continues them, so the cap holds over its batches.
_LANE_TAILS: dict[tuple[str, int], list[Optional[str]]] = {}


# ---------------------------------------------------------------------------------------------------
# The submitter


class SubmissionError(RuntimeError):
    """sbatch refused the job; the message has its reason and what to change."""


class SlurmSubmitter:
    """Decide which cells to submit, submit them as arrays, record the jobs; return an exit code."""

    def __init__(self, sweep_dir: Path, records: list[CellRecord], opts: SlurmOptions, console: Any = None,
                 app: Any = None) -> None:
        from launcher.console import Console

        self.sweep_dir = Path(sweep_dir)
        self.app = app if app is not None else apps.for_records(records)
        self.records = records
        self._overrides = {r.id: r.overrides for r in records}
        self.opts = opts
        self.rerun = Rerun(opts.rerun)
        self.console = console or Console(records, column=self.app.column)
        self.owner = Owner.this_process(backend="slurm")
        self.folder = self.sweep_dir / SUBMITIT_DIR
        self._store = manifest.store_dir(opts.store)
        self.arrays: list[tuple[str, ArrayPlan]] = []  # (job id, plan) of every array submitted

    def dir(self, cid: str) -> Path:
        return cellstate.cell_dir(self.sweep_dir, cid)

    def statuses(self, ids: list[str]) -> dict[str, CellStatus]:
        """Each cell's status as the local backend reads it (the sweep folder's cell, or the store's entry
        a new sweep folder does not link yet), refined by what Slurm says of its job."""
        raw = {cid: manifest.entry_status(manifest.cell_entry(self.sweep_dir, cid, self._store),
                                          self.opts.stale_after_s) for cid in ids}
        return refresh_status(self.sweep_dir, raw, self._store)

    def run(self) -> int:
        ids = [r.id for r in self.records]
        statuses = self.statuses(ids)
        manifest.say_damaged(self.console, ids, statuses, self.sweep_dir, DAMAGED_LINES)
        selected = [cid for cid in ids if self.rerun.wants(statuses[cid].state)]
        if self.opts.dry_run:
            return self._dry_run(statuses, selected)
        if not selected:
            if all(s.state.settled for s in statuses.values()):
                pruned = sum(s.state == CellState.PRUNED for s in statuses.values())
                done = f"finished ({len(ids) - pruned} DONE, {pruned} PRUNED)" if pruned else "DONE"
                self.console.say(f"All {len(ids)} cells are {done}; nothing to submit. Sweep folder: {self.sweep_dir}")
            else:
                self.console.say(f"No cell matches hydra.launcher.rerun={self.rerun.value}; nothing to submit. "
                                 f"Sweep folder: {self.sweep_dir}")
            return 0
        claims = self._claim(selected)
        try:
            jobs = self._submit(claims) if claims else {}
        finally:
            for claim in claims.values():  # the cells not submitted (sbatch refused); the rest are released
                claim.release()
        return self._report(ids, selected, jobs)

    def _claim(self, selected: list[str]) -> dict[str, Claim]:
        """Claim the cells to submit; drop those another launcher holds or whose job is live."""
        claims: dict[str, Claim] = {}
        for cid in selected:
            claim = manifest.try_claim(self.dir(cid), self.owner, self.opts.stale_after_s)
            if claim is None:
                holder = manifest.claim_holder(self.dir(cid), self.opts.stale_after_s)
                who = f"job {holder.job_id}" if holder and holder.job_id else "another launcher"
                self.console.cell(cid, CellState.RUNNING, f"(held by {who}; not submitted)")
                continue
            claims[cid] = claim
        # Under the claims, look again: another launcher may have submitted or finished them meanwhile.
        fresh = self.statuses(list(claims))
        live = job_states(r.job_id for r in (read_record(self.dir(c)) for c in claims) if r is not None)
        for cid in list(claims):
            s = fresh[cid]
            rec = read_record(self.dir(cid))
            job_live = rec is not None and live.get(rec.job_id) in LIVE
            if job_live or not self.rerun.wants(s.state):
                claims.pop(cid).release()
                why = f"already queued as job {rec.job_id}" if job_live and rec else s.state.value
                self.console.cell(cid, s.state, f"({why}; not submitted)")
        return claims

    def _executor(self) -> Any:
        import shlex
        import sys

        from submitit import SlurmExecutor

        self.folder.mkdir(parents=True, exist_ok=True)
        python = self.opts.python or shlex.quote(sys.executable)
        ex = SlurmExecutor(folder=self.folder, max_num_timeout=self.opts.max_requeues, python=python)
        ex.update_parameters(**sbatch_parameters(self.opts))
        return ex

    def _submit(self, claims: dict[str, Claim]) -> dict[str, str]:
        """Submit the claimed cells array by array (:func:`array_layout`); return ``{cell_id: job_id}``.

        Each array's claims are released (and popped from ``claims``) as soon as its records are written.
        """
        from launcher.slurm_job import CellJob

        ex = self._executor()
        hub_offline = self.app.hub_offline and cells_hub_offline()  # App.hub_offline
        starts: dict[str, CellStatus] = {}  # the status each cell's PENDING record is written over
        for cid in claims:  # under the claims, before any job can start: as the local backend does
            status = cellstate.read_status(self.dir(cid))
            fresh = manifest.prepare_rerun(self.dir(cid), status, self.rerun, say=self.console.say)
            starts[cid] = status if fresh is None else fresh
        cap = int(self.opts.array_parallelism)
        ids = list(claims)
        tails = self._open_lanes(cap)
        layout = array_layout(len(ids), cap, self.opts.max_array_size or max_array_size(),
                              lanes=len(tails) if tails else None)
        tails = tails or [None] * (max(a.lane for a in layout) + 1)
        jobs: dict[str, str] = {}
        for plan in layout:
            part = [ids[i] for i in plan.cells]
            after = self.arrays[plan.after][0] if plan.after is not None else tails[plan.lane]
            tasks = [CellJob(cell_dir=str(self.dir(cid).resolve()), requeue=self.opts.requeue,
                             heartbeat_s=self.opts.heartbeat_s, claim_wait_s=self.opts.claim_wait_s,
                             python=self.opts.python or "", cell_module=self.opts.cell_module,
                             require_gpu=self.opts.wants_gpu, hub_offline=hub_offline) for cid in part]
            try:
                ex.update_parameters(**sbatch_parameters(self.opts, plan.parallelism, after))
                with ex.batch():
                    submitted = [ex.submit(t) for t in tasks]
            except Exception as e:  # submitit raises its own errors with sbatch's message
                if jobs:
                    self.console.say(f"warning: {len(jobs)} cells were submitted before this failure")
                raise SubmissionError(
                    f"sbatch refused the array of {len(part)} cells: {e}\n"
                    f"Check hydra.launcher.partition/account/qos/gres (the script is in {self.folder}); "
                    "`sinfo` lists partitions.") from e
            now = time.time()
            for cid, job in zip(part, submitted):
                self._record(cid, job, now, starts[cid])
                jobs[cid] = job.job_id
                claims.pop(cid).release()  # the job may start now: it claims the cell itself
            array_id = submitted[0].job_id.split("_", 1)[0]
            self.arrays.append((array_id, plan))
            tails[plan.lane] = array_id
            _LANE_TAILS[(str(self.sweep_dir.resolve()), cap)] = tails
        return jobs

    def _open_lanes(self, cap: int) -> Optional[list[Optional[str]]]:
        """The lanes an earlier batch of this command left under the same cap, if any of them still runs."""
        tails = _LANE_TAILS.get((str(self.sweep_dir.resolve()), cap))
        if not tails:
            return None
        live = live_arrays(t for t in tails if t is not None)
        return [t if t in live else None for t in tails] if live else None

    def _record(self, cid: str, job: Any, now: float, status: CellStatus) -> None:
        """Write ``slurm.json`` and a PENDING ``status.json`` naming the job, over ``status`` (the cell's
        status read under the claim, or the fresh one of a cell whose files were set aside)."""
        cell = self.dir(cid)
        old = read_record(cell)
        previous = (old.previous_jobs + [old.job_id]) if old is not None else []
        write_record(cell, SlurmRecord(job_id=job.job_id, submitted=now, submitter=f"{cellstate.HOST}:{self.owner.pid}",
                                       stdout=str(job.paths.stdout).replace("%t", "0"),
                                       stderr=str(job.paths.stderr).replace("%t", "0"),
                                       previous_jobs=previous[-20:]))
        manifest.write_hydra_metadata(cell, self._overrides.get(cid, []))
        cellstate.write_status(cell, dataclasses.replace(
            status, state=CellState.PENDING, backend="slurm", job_id=job.job_id, host=None, owner_pid=None,
            owner_start=None, pid=None, started=None, heartbeat=now, ended=None, duration_s=None,
            exit_code=None, error=None, interrupted=False, metrics={}))

    def _report(self, ids: list[str], selected: list[str], jobs: dict[str, str]) -> int:
        for cid, jid in jobs.items():
            self.console.cell(cid, CellState.PENDING, f"(submitted as job {jid})")
        listing = ", ".join(
            f"{a} ({len(plan.cells)} cell{'s' if len(plan.cells) > 1 else ''}, %{plan.parallelism}"
            + (f", after {self.arrays[plan.after][0]}" if plan.after is not None else "") + ")"
            for a, plan in self.arrays) or "none"
        lanes = len({plan.lane for _, plan in self.arrays})
        cap_note = (f"; at most {self.opts.array_parallelism} cells run at once"
                    + (f" ({lanes} lanes)" if lanes > 1 else "")) if jobs else ""
        self.console.say(
            f"submitted {len(jobs)} of {len(ids)} cells to Slurm; job arrays: {listing}{cap_note}\n"
            f"sweep folder: {self.sweep_dir}\n"
            f"watch: python -m launcher.status {self.sweep_dir}   (Slurm logs: {self.folder})")
        return 0

    def wait(self, sleep: Any = time.sleep) -> dict[str, CellStatus]:
        """``hydra.launcher.wait=true``: poll until no cell of this launch is owned by a live Slurm job
        (submitted now, or found queued or running); return every cell's status as Slurm sees it.

        Each poll is one :meth:`statuses` of the cells still waited for (``squeue``, ``sacct`` only for
        jobs ``squeue`` no longer lists), every ``poll_s`` seconds. A cell is waited for while its status
        names a Slurm job and reads PENDING or RUNNING: a requeued job stays waited for, a job that
        Slurm cancelled, killed or forgot ends the wait for its cell (FAILED, CANCELLED, TIMEOUT). Each
        cell that ends is printed as it is seen; a line of counts when they change (at most once a
        minute)."""
        ids = [r.id for r in self.records]
        statuses = self._look(ids)
        waiting = owned_by_slurm(statuses)
        if not waiting:
            return statuses
        self.console.say(f"waiting for {_cells(len(waiting))} queued or running in Slurm (hydra.launcher.wait=true, "
                         f"a look every {self.opts.poll_s:g} s); Ctrl-C stops waiting, not the jobs")
        shown: Optional[str] = None
        shown_at = float("-inf")
        while waiting:
            sleep(self.opts.poll_s)
            fresh = self._look(waiting)
            statuses.update(fresh)
            still = owned_by_slurm(fresh)
            for cid in waiting:
                if cid not in still:
                    s = fresh[cid]
                    self.console.cell(cid, s.state, cellstate.error_headline(s.error) or "")
            waiting = still
            if waiting:
                running = sum(fresh[c].state == CellState.RUNNING for c in waiting)
                line = f"{_cells(len(waiting))} in Slurm: {running} running, {len(waiting) - running} queued"
                if line != shown and time.monotonic() - shown_at >= COUNTS_EVERY_S:
                    self.console.say(line)
                    shown, shown_at = line, time.monotonic()
        return statuses

    def _look(self, ids: list[str]) -> dict[str, CellStatus]:
        """:meth:`statuses`, where a cell that Slurm's answer says ended without the cell's own word is
        read once more: its job may have ended between the read of its ``status.json`` and Slurm's
        answer (the job writes its end before Slurm calls it COMPLETED)."""
        seen = self.statuses(ids)
        again = [cid for cid, s in seen.items()
                 if s.backend == "slurm" and not s.state.settled and cid not in owned_by_slurm({cid: s})]
        if again:
            seen.update(self.statuses(again))
        return seen

    def _dry_run(self, statuses: dict[str, CellStatus], selected: list[str]) -> int:
        from launcher.console import dry_run_listing

        self.console.say(dry_run_listing(self.console, self.records, statuses, selected, self.opts.list_rows,
                                         slurm=True))
        import shlex
        import sys

        # One cell is a plain job, more are an array (submitit's choice); the other arrays get the same
        # script with their own --array=0-(n-1)%p_l and, chained in a lane, --dependency=afterany.
        layout = array_layout(len(selected), int(self.opts.array_parallelism),
                              self.opts.max_array_size or max_array_size())
        first = layout[0] if layout else None
        count = len(first.cells) if first else 0
        script = sbatch_script(self.opts, self.folder, map_count=count if count > 1 else None,
                               python=self.opts.python or shlex.quote(sys.executable),
                               parallelism=first.parallelism if first else None)
        self.console.say(f"\nsbatch script (first array):\n{script}")
        if len(layout) > 1:
            self.console.say(f"{len(layout)} arrays, at most {self.opts.array_parallelism} cells at once "
                             f"over all of them:\n{describe_layout(layout)}")
        lines = self.app.dry_run_estimate(self.sweep_dir, selected, self.opts.store, timeout_min=self.opts.timeout_min,
                                          gpu=slurm_gpu(self.opts.gres, self.opts.gpus_per_node))
        if lines:
            self.console.say(lines)
        self.console.say(f"dry run: {len(selected)} of {len(self.records)} cells would be submitted, unless queued "
                         f"already (hydra.launcher.rerun={self.rerun.value}); sweep folder: {self.sweep_dir}")
        return 0


def check_options(launcher_cfg: Any, adaptive: bool = False) -> None:
    """Raise ``ValueError`` naming the ``hydra.launcher`` key whose value cannot run, or saying why this
    launch cannot: no Slurm on this machine (a dry run needs none). An adaptive sweeper is accepted: the
    Optuna sweeper submits worker jobs that ask, run and tell on the shared study themselves
    (:mod:`launcher.optuna_worker`); ``wait=true`` is refused for it (there are no cells to wait for)."""
    opts = SlurmOptions.from_config(launcher_cfg)
    if opts.wait and _optuna_study(launcher_cfg):
        raise ValueError("hydra.launcher.wait=true does not apply to an Optuna study on Slurm: its worker jobs "
                         "ask, run and tell on their own; drop the key and watch them with python -m "
                         "launcher.status SWEEP_DIR")
    if opts.dry_run:
        return
    if shutil.which("sbatch") is None:
        raise ValueError("hydra/launcher=slurm needs Slurm, and this machine has no sbatch on its PATH: launch "
                         "from a machine of the cluster (a login node), or add hydra.launcher.dry_run=true to "
                         "see the cells and the batch script")


def _optuna_study(launcher_cfg: Any) -> bool:
    """Whether the command's sweeper is the Optuna study (``hydra/sweeper=optuna``): it submits worker
    jobs itself (:mod:`launcher.optuna_worker`), so there are no cells for :func:`run` to wait for.
    Read from the composed ``hydra`` node that holds ``launcher_cfg`` (a plain dict has none)."""
    get_parent = getattr(launcher_cfg, "_get_parent", None)
    hydra_cfg = get_parent() if callable(get_parent) else None
    try:
        target = str(hydra_cfg.sweeper._target_) if hydra_cfg is not None else ""
    except Exception:  # noqa: BLE001 (no sweeper node: not a study)
        return False
    return target.endswith(".OptunaSweeper")


def slurm_gpu(gres: Optional[str], gpus_per_node: Optional[int]) -> Optional[str]:
    """How a Slurm cell gets a GPU (as :attr:`SlurmOptions.wants_gpu` decides), or None."""
    if "gpu" in str(gres or ""):
        return f"hydra.launcher.gres={gres}"
    if gpus_per_node:
        return f"hydra.launcher.gpus_per_node={gpus_per_node}"
    return None


def owned_by_slurm(statuses: Mapping[str, CellStatus]) -> list[str]:
    """The cells whose status names a Slurm job that has not ended: queued (PENDING, also while it is
    requeued) or RUNNING, as :func:`launcher.slurm_state.refresh_status` reads them."""
    return [cid for cid, s in statuses.items()
            if s.backend == "slurm" and s.job_id and s.state in (CellState.PENDING, CellState.RUNNING)]


def _cells(n: int) -> str:
    return f"{n} cell" + ("" if n == 1 else "s")


def _stop_waiting(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(sweep_dir: Path, records: list[CellRecord], launcher_cfg: Any, summary: bool = True, hooks: Any = None,
        collect: Optional[dict] = None, app: Any = None) -> int:
    """Backend entry point used by :mod:`launcher.plugin`: submit, print the job ids, return at once
    (exit code 0 once submitted); ``hooks`` are the local backend's (a submitter runs no cell itself).

    With ``hydra.launcher.wait=true`` it then waits (:meth:`SlurmSubmitter.wait`) until every cell of
    ``records`` that a Slurm job owns has ended, fills ``collect`` with every cell's status, prints the
    summary unless ``summary=False`` (the caller prints one for several launches), and returns 0 when
    every cell is DONE (or PRUNED), else 1. Ctrl-C (or SIGTERM) while waiting leaves the jobs running,
    says so, and exits 130."""
    import signal
    import threading

    opts = SlurmOptions.from_config(launcher_cfg)
    submitter = SlurmSubmitter(sweep_dir, records, opts, app=app)
    try:
        code = submitter.run()
    except SubmissionError as e:
        print(f"error: {e}", flush=True)
        return 1
    if not opts.wait or opts.dry_run:
        return code
    main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _stop_waiting) if main else None
    try:
        statuses = submitter.wait()
    except KeyboardInterrupt:
        print(f"\nInterrupted: stopped waiting; the submitted jobs keep running in Slurm (scancel stops them).\n"
              f"watch: python -m launcher.status {submitter.sweep_dir}\n"
              "Re-issue the same command to wait for them again: it submits no cell that is DONE, queued or "
              "running.", flush=True)
        raise SystemExit(130) from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, old_term if old_term is not None else signal.SIG_DFL)
    if collect is not None:
        collect.update(statuses)
    if summary:
        submitter.console.summary(records, statuses, submitter.sweep_dir)
    return code if code else (0 if all(s.state.settled for s in statuses.values()) else 1)
