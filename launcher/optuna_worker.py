"""An Optuna study on Slurm: worker jobs that each loop ask → run a cell → tell on the shared study.

``python -m launcher +sweep=optuna_proxy hydra/launcher=slurm …`` does not wait for results on the login
node. The sweeper (:mod:`launcher.optuna_sweeper`) creates or opens the study (its journal file in the
sweep folder, on the shared filesystem), writes ``study.json``, and :func:`submit_workers` submits ``N``
worker jobs as one array (``N``: ``hydra.sweeper.n_jobs``, else ``hydra.launcher.workers``; at most
``hydra.launcher.array_parallelism`` run at once), with the same sbatch options as cells; then it prints
the study, its storage and the job ids, and exits 0.

Each worker job (:class:`WorkerJob`, pickled by submitit like :class:`launcher.slurm_job.CellJob`) runs
the same command again on its node, in the submitting folder, with the local backend
(``hydra/launcher=local``, one cell at a time, ``hydra.launcher.threads_per_cell`` = ``cpus_per_task``)
and ``PROXYATTENTION_OPTUNA_WORKER`` set to its job id. In that mode the sweeper runs
:class:`WorkerLoop`: under a file lock next to the journal (``optuna.journal.ask.lock``; ``flock``,
which also holds across NFS clients) it counts the study's trials and either takes over a RUNNING trial
whose worker is gone (the same trial: its cell resumes from its checkpoint), or asks a new one while
COMPLETE + PRUNED + FAIL + RUNNING < ``n_trials``, so concurrent workers never overshoot. Outside the
lock it plans the trial's cell (and its paired baseline), runs it with the pruning monitor, tells the
result (COMPLETE / PRUNED / FAIL) and refreshes ``study.json``. A worker whose loop finds the study full
exits. DONE cells are never retrained: a trial whose cell the store has DONE gets its value at once; two
trials sharing a baseline share its cell (one worker runs it, the other waits for it).

**Time limit.** ``hydra.launcher.timeout_min`` is each *worker's* ``--time`` (it runs several cells in
turn): choose it to cover the cells a worker is expected to run (≈ n_trials / N cells and the baseline).
At the limit (Slurm's warning signal, ``signal_delay_s`` before it) the worker stops its cell at its last
checkpoint; its trial stays RUNNING. With ``hydra.launcher.requeue`` (the default) the worker job is then
requeued by submitit, keeping its job id, at most ``max_requeues`` times: it starts again, takes its own
RUNNING trial back first (the same trial: its cell resumes from its checkpoint) and loops on. Without a
requeue, or past ``max_requeues``, the trial is resumed by another worker still looping or by the
workers of a re-issued command.

**Failures.** ``hydra.sweeper.max_failure_rate`` counts the trials of every worker of the command (one
job array): once more than that share of them FAILED, each worker asks no more trials.

**Re-issue.** The sweep folder's ``slurm/workers.json`` lists the worker jobs; a re-issue asks Slurm
which are still queued or running and submits only ``max(0, N − live)`` workers (fewer when fewer trials
are left), and none when the study has its ``n_trials`` finished trials.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Iterator, List, Optional, Sequence

WORKER_ENV = "PROXYATTENTION_OPTUNA_WORKER"  # set in a worker job's command: the sweeper loops as a worker
WORKERS_FILE = "workers.json"  # SWEEP_DIR/slurm/workers.json: every worker job submitted for the study
LOCK_SUFFIX = ".ask.lock"
WORKER_ATTR = "worker"  # the trial's user attribute naming the worker that runs it


# ------------------------------------------------------------------------------------------ the lock

@contextlib.contextmanager
def ask_lock(path: Path | str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing). Each entry opens the file anew, so it
    excludes other threads of this process as well as other processes and hosts."""
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def lock_path(storage_kind: str, where: str, sweep_dir: Path) -> Path:
    """The lock next to a journal file (an RDB study: in the sweep folder)."""
    if storage_kind == "journal":
        return Path(where + LOCK_SUFFIX)
    return Path(sweep_dir) / ("optuna" + LOCK_SUFFIX)


# ------------------------------------------------------------------------------------------ the loop

@dataclass
class WorkerLoop:
    """One worker's loop over a shared study (see the module docstring).

    ``new_overrides(trial)``: suggest the trial's parameters and return its overrides. ``run(trial,
    overrides)``: run its cell(s) and tell the study; return the state told (``"COMPLETE"``, ``"PRUNED"``,
    ``"FAIL"``), or None when the worker was interrupted (the trial stays RUNNING: the loop stops).
    ``alive(worker_id)``: whether that worker still runs (a RUNNING trial of a dead one is taken over).
    ``stop()``: checked after each trial (e.g. too many failures).
    """

    study: Any
    n_trials: int
    worker_id: str
    lock: Path
    new_overrides: Callable[[Any], List[str]]
    run: Callable[[Any, List[str]], Optional[str]]
    alive: Callable[[str], bool]
    stop: Callable[[], bool] = lambda: False
    elsewhere: Callable[[Any], bool] = lambda t: False  # a RUNNING trial of no worker whose cell another command runs
    say: Callable[[str], None] = print
    # The sampler for a study that has n trials, made again before each ask: a seeded sampler's random state
    # is per process, so two workers that opened the study at once would otherwise propose the same trials.
    reseed: Optional[Callable[[int], Any]] = None
    told: List[tuple] = field(default_factory=list)  # (trial number, state) of this worker's trials

    def next_trial(self) -> Optional[tuple[Any, List[str], bool]]:
        """Under the lock: ``(trial, overrides, resumed)`` this worker runs next, or None (study full)."""
        from optuna.trial import Trial, TrialState

        with ask_lock(self.lock):
            trials = self.study.get_trials(deepcopy=False)
            for t in trials:
                if t.state != TrialState.RUNNING:
                    continue
                owner = t.user_attrs.get(WORKER_ATTR)
                overrides = t.user_attrs.get("overrides")
                # A worker runs one trial at a time and asks only between trials: a RUNNING trial of its
                # own job id is one it left at its time limit, before Slurm requeued it. Take it back.
                if owner is not None and owner != self.worker_id and self.alive(str(owner)):
                    continue  # its worker runs it
                if owner is None and self.elsewhere(t):
                    continue  # a launcher on another machine runs its cell (hydra/launcher=local)
                if not overrides:  # asked, never given its parameters: nothing to resume
                    self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
                    continue
                trial = Trial(self.study, t._trial_id)  # the same trial again
                trial.set_user_attr(WORKER_ATTR, self.worker_id)
                return trial, list(overrides), True
            counted = sum(t.state != TrialState.WAITING for t in self.study.get_trials(deepcopy=False))
            if counted >= self.n_trials:
                return None
            if self.reseed is not None:
                sampler = self.reseed(len(trials))
                if sampler is not None:
                    self.study.sampler = sampler
            trial = self.study.ask()
            trial.set_user_attr(WORKER_ATTR, self.worker_id)
            try:
                overrides = self.new_overrides(trial)
            except BaseException:
                self.study.tell(trial, state=TrialState.FAIL)
                raise
            trial.set_user_attr("overrides", overrides)
            return trial, overrides, False

    def loop(self) -> List[tuple]:
        while True:
            nxt = self.next_trial()
            if nxt is None:
                break
            trial, overrides, resumed = nxt
            if resumed:
                self.say(f"worker {self.worker_id}: resuming trial {trial.number}")
            state = self.run(trial, overrides)
            if state is None:
                break
            self.told.append((trial.number, state))
            if self.stop():
                break
        return self.told


def array_of(job_id: str) -> str:
    """The job array a worker job belongs to (``80`` for ``80_1``): the workers one command submitted."""
    return str(job_id).split("_", 1)[0]


def command_failures(study: Any, worker_id: str) -> tuple[int, int]:
    """``(failed, finished)``: the FAIL trials, and the finished ones (COMPLETE, PRUNED, FAIL), among the
    trials the workers of ``worker_id``'s job array ran: ``hydra.sweeper.max_failure_rate`` is the
    command's, as it is for a local study, not each worker's."""
    from optuna.trial import TrialState

    array = array_of(worker_id)
    failed = finished = 0
    for t in study.get_trials(deepcopy=False):
        owner = t.user_attrs.get(WORKER_ATTR)
        if owner is None or array_of(str(owner)) != array or not t.state.is_finished():
            continue
        finished += 1
        failed += t.state == TrialState.FAIL
    return failed, finished


def slurm_alive(job_id: str) -> bool:
    """Whether a worker (its Slurm job id) is queued or running; a worker id that is not a Slurm job's
    (a test's) counts as alive while its process holds nothing: never taken over by mistake."""
    from launcher.slurm_state import LIVE, job_states

    if not job_id.replace("_", "").isdigit():
        return True
    state = job_states([job_id]).get(job_id)
    return state is None or state in LIVE  # unknown yet (accounting lag): alive


# ------------------------------------------------------------------------------------------ the records

def workers_file(sweep_dir: Path) -> Path:
    from launcher.slurm import SUBMITIT_DIR

    return Path(sweep_dir) / SUBMITIT_DIR / WORKERS_FILE


def read_workers(sweep_dir: Path) -> List[str]:
    from launcher import fileio

    d = fileio.read_json(workers_file(sweep_dir)) or {}
    jobs = d.get("jobs")
    return [str(j) for j in jobs] if isinstance(jobs, list) else []


def live_workers(sweep_dir: Path) -> List[str]:
    """The worker jobs of this sweep folder that Slurm still has queued or running."""
    from launcher.slurm_state import LIVE, job_states

    jobs = read_workers(sweep_dir)
    states = job_states(jobs)
    return [j for j in jobs if states.get(j) in LIVE]


def worker_summary(sweep_dir: Path) -> Optional[dict]:
    """``{"jobs", "live"}`` of a sweep folder's worker jobs (None: it has none)."""
    jobs = read_workers(sweep_dir)
    if not jobs:
        return None
    try:
        live = live_workers(sweep_dir)
    except Exception:  # noqa: BLE001 (status must answer without Slurm)
        live = []
    return {"jobs": jobs, "live": live}


# ------------------------------------------------------------------------------------------ the worker job

@dataclass
class WorkerJob:
    """What one worker array task runs: ``python -m launcher ARGV`` in the submitting folder, as a
    worker (``PROXYATTENTION_OPTUNA_WORKER`` = its job id). Picklable: holds only strings."""

    argv: List[str]
    cwd: str
    python: str = ""
    env: dict = field(default_factory=dict)
    stop_grace_s: float = 60.0
    requeue: bool = True  # at the time-limit warning: stop the cell at its checkpoint, requeue this job

    def __post_init__(self) -> None:
        self._child: Optional[subprocess.Popen] = None
        self._signalled = False

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's checkpointing protocol, called at the time-limit signal: the same worker again
        (None: not requeued). The running cell has been stopped at its checkpoint by then."""
        from launcher.slurm_job import resubmission

        return resubmission(self, *args, **kwargs)

    def __getstate__(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__post_init__()

    def __call__(self) -> dict:
        from launcher.slurm_job import ignore_usr2, requeue_through_submitit, slurm_job_id

        job_id = slurm_job_id() or f"pid{os.getpid()}"
        env = {**os.environ, **self.env, WORKER_ENV: job_id}
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        signal.signal(signal.SIGUSR2, self._on_usr2)  # the time-limit warning: stop the cell, keep the trial
        cmd = [self.python or sys.executable, "-m", "launcher", *self.argv]
        print(f"worker {job_id}: {' '.join(cmd)}", flush=True)
        self._child = subprocess.Popen(cmd, cwd=self.cwd, env=env, preexec_fn=ignore_usr2)
        try:
            rc = self._child.wait()
        except BaseException:
            self._stop_child()
            raise
        if self._signalled and self.requeue and rc != 0:  # past max_requeues the trial waits for another worker
            print(f"worker {job_id}: requeued; it takes its trial back when it starts again", flush=True)
            requeue_through_submitit(submitit_handler)
        if rc != 0:
            raise RuntimeError(f"worker {job_id} exited {rc} (its log above; python -m launcher.status "
                               f"names its trials' cells)")
        return {"exit_code": rc}

    def _on_usr2(self, signum: int, frame: Optional[FrameType]) -> None:
        self._signalled = True
        then = "this worker, requeued" if self.requeue else "another worker"
        print(f"caught {signal.Signals(signum).name}: time limit near; stopping the running cell (its trial "
              f"stays RUNNING and resumes in {then})", flush=True)
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signal.SIGTERM)

    def _stop_child(self) -> None:
        child = self._child
        if child is None or child.poll() is not None:
            return
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=self.stop_grace_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


# The launcher keys a worker's local backend takes from the Slurm launcher's (the rest are Slurm's).
_SHARED_KEYS = ("heartbeat_s", "stale_after_s", "cell_module", "list_rows", "objective", "objective_vs_baseline")


def worker_argv(config: Any, sweep_dir: Path, opts: Any) -> List[str]:
    """The overrides a worker's ``python -m launcher`` runs with: the command's own, on the local
    backend (one cell at a time, ``cpus_per_task`` threads), the same sweep folder and store."""
    from omegaconf import OmegaConf

    task = [str(o) for o in OmegaConf.to_container(config.hydra.overrides.task, resolve=False)]
    hydra_ov = [str(o) for o in OmegaConf.to_container(config.hydra.overrides.hydra, resolve=False)]
    kept = [o for o in hydra_ov if not o.lstrip("+~").startswith(("hydra/launcher=", "hydra.launcher.",
                                                                  "hydra.sweep.dir=", "hydra.sweeper.n_jobs="))]
    lcfg = config.hydra.launcher
    store = opts.store
    launcher = ["hydra/launcher=local", "hydra.launcher.workers=1",
                f"hydra.launcher.threads_per_cell={int(opts.cpus_per_task)}",
                f"hydra.launcher.store={_quote(str(Path(store).absolute())) if store else 'null'}"]
    if not opts.wants_gpu:
        launcher.append("hydra.launcher.gpus=''")
    for key in _SHARED_KEYS:
        if key in lcfg:
            value = OmegaConf.to_container(lcfg, resolve=True)[key]
            launcher.append(f"hydra.launcher.{key}={_value(value)}")
    return [*task, *kept, *launcher, f"hydra.sweep.dir={_quote(str(Path(sweep_dir).absolute()))}",
            "hydra.sweeper.n_jobs=1"]


def _quote(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return _quote(str(v))


def submit_workers(sweep_dir: Path, opts: Any, n_workers: int, argv: Sequence[str], *, finished: int,
                   n_trials: int, say: Callable[[str], None] = print,
                   executor: Optional[Any] = None, hub_offline: bool = True) -> List[str]:
    """Submit the workers the study still needs (see the module docstring); return their job ids."""
    import shlex

    from launcher import fileio
    from launcher.slurm import (
        SUBMITIT_DIR,
        SubmissionError,
        cells_hub_offline,
        sbatch_parameters,
    )

    sweep_dir = Path(sweep_dir)
    if finished >= n_trials:
        say(f"the study has its {n_trials} trials ({finished} finished); no worker to submit "
            "(raise hydra.sweeper.n_trials to continue it)")
        return []
    live = live_workers(sweep_dir)
    wanted = min(n_workers, max(1, n_trials - finished))  # never more workers than trials left to run
    need = max(0, wanted - len(live))
    if need == 0:
        say(f"{len(live)} worker job(s) of this study are queued or running ({', '.join(live)}); none submitted")
        return []
    if executor is None:
        from submitit import SlurmExecutor

        folder = sweep_dir / SUBMITIT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        python = opts.python or shlex.quote(sys.executable)
        executor = SlurmExecutor(folder=folder, max_num_timeout=int(opts.max_requeues), python=python)
    params = sbatch_parameters(opts, parallelism=min(need, int(opts.array_parallelism)))
    params["job_name"] = f"{opts.job_name}-worker"
    env = {}
    if hub_offline and cells_hub_offline():  # the app's App.hub_offline
        env["HF_HUB_OFFLINE"] = "1"
    job = WorkerJob(argv=list(argv), cwd=os.getcwd(), python=opts.python or "", env=env, requeue=bool(opts.requeue))
    try:
        executor.update_parameters(**params)
        with executor.batch():
            submitted = [executor.submit(job) for _ in range(need)]
    except Exception as e:  # submitit raises its own errors with sbatch's message
        raise SubmissionError(f"sbatch refused the {need} worker job(s): {e}\nCheck hydra.launcher.partition/"
                              "account/qos/gres; `sinfo` lists partitions.") from e
    ids = [j.job_id for j in submitted]
    workers_file(sweep_dir).parent.mkdir(parents=True, exist_ok=True)
    fileio.write_json_atomic(workers_file(sweep_dir), {"jobs": read_workers(sweep_dir) + ids,
                                                      "submitted": time.time()})
    return ids
