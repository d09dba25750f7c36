"""The Hydra side of a sweep: a launcher that turns Hydra's jobs into cells, and a sweeper.

Hydra's ``BasicSweeper`` expands the grid (``key=a,b``, ``hydra.sweeper.params``) into jobs and hands
them to a launcher's ``launch()``. :class:`SweepLauncher.launch` plans every job (compose, validate,
add paired baselines, cell ids — :mod:`launcher.plan`), writes the cell folders and the sweep
definition, then gives the cells to a *backend*: a module ``launcher.<backend>`` with a function
``run(sweep_dir, records, launcher_cfg) -> exit code`` (``launcher.local``; ``launcher.slurm``).
Nothing runs in the Hydra process itself.

Hydra only instantiates plugins defined under the ``hydra_plugins`` package, so the classes Hydra
sees are two-line subclasses in ``hydra_plugins/proxyattention_launcher``; the code lives here (and, for
the adaptive sweeper ``hydra/sweeper=optuna``, in :mod:`launcher.optuna_sweeper`).

:class:`CellSweeper` is ``BasicSweeper`` without its pre-launch composition of every job (~0.1 s a
job through Hydra): :func:`launcher.plan.plan_sweep` validates every job anyway, faster, before any
cell starts.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from launcher import manifest
from launcher.cellproc import CELL_MODULE
from proxyattention import cellstate, fileio

log = logging.getLogger(__name__)

# The exit code of the last launch; ``python -m launcher`` exits with it (Hydra itself returns None).
EXIT_CODE = 0
# Set by ``python -m launcher``: jobs must become cells, so a launcher that is not ours is refused.
CELL_LAUNCHERS_ONLY = False
FOREIGN_LAUNCHER = ("python -m launcher runs sweeps through this project's launchers only "
                    "(hydra/launcher=local, slurm or slurm_v100); to run trials with one of Hydra's own "
                    "launchers use python -m proxyattention.train -m hydra/launcher=NAME ...")


@dataclass
class LocalLauncherConf:
    """``hydra/launcher=local``: run cells as local subprocesses (see launcher.local)."""

    _target_: str = "hydra_plugins.proxyattention_launcher.LocalLauncher"
    workers: int = 1  # cells at once; each gets its own GPU round-robin when GPUs exist
    timeout_min: Optional[float] = None  # per-cell wall-clock limit; kills the process group -> TIMEOUT
    rerun: str = "not_done"  # not_done | failed (FAILED/TIMEOUT/CANCELLED/DAMAGED) | damaged | all (force)
    dry_run: bool = False  # list the cells and which would run; run nothing
    threads_per_cell: int = 0  # OMP_NUM_THREADS of each cell; 0: cores // workers
    gpus: Optional[str] = None  # "0,1": GPUs to use; null: CUDA_VISIBLE_DEVICES, else nvidia-smi -L
    heartbeat_s: float = 10.0  # how often a running cell's status and claim are refreshed
    stale_after_s: float = 120.0  # a claim from another host without heartbeat this long is taken over
    cell_module: str = CELL_MODULE  # run as `python -m <cell_module> CELL_DIR`
    store: Optional[str] = "outputs/cells"  # the cell store every sweep links its cells from (null: none)
    list_rows: int = 60  # rows of a dry run's listing (0: every cell)
    # What each job returns to an adaptive sweeper (a validation metric; a list: one per objective).
    objective: Any = "val/acc_best"
    objective_vs_baseline: bool = False  # return proxy − paired baseline of the objective instead


@dataclass
class CellSweeperConf:
    _target_: str = "hydra_plugins.proxyattention_launcher.CellSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="hydra/launcher", name="local_schema", node=LocalLauncherConf, provider="proxyattention")
    cs.store(group="hydra/sweeper", name="cells", node=CellSweeperConf, provider="proxyattention")
    # conf/config.yaml's `sweeper_default`: hydra/sweeper=cells unless a saved sweep or the command line
    # chooses another. An override in the primary config itself would win over a saved sweep's; one in a
    # config it includes is applied after the saved sweep's (Hydra expands the defaults last to first).
    cs.store(name="sweeper_default", node={"defaults": [{"override /hydra/sweeper": "cells"}]},
             provider="proxyattention")


def sweep_name(task_overrides: Any, config_name: Optional[str] = None, params: Any = None) -> str:
    """The default sweep folder name: readable overrides plus a hash of everything that defines the jobs.

    That is the command-line overrides (in any order), the sweeper's ``params`` from YAML (a saved sweep,
    ``--config-name``) and the config's name when it is not the default one. The same definition names
    the same folder, so re-issuing it resumes; cells are reused from the store whatever the folder.
    """
    items = sorted(str(o) for o in (task_overrides or []))
    defined = list(items)
    if params:
        defined += sorted(f"params:{k}={v}" for k, v in dict(params).items())
    if config_name and config_name != "config":
        defined.append(f"config_name={config_name}")
    digest = hashlib.sha256("\n".join(defined).encode()).hexdigest()[:10]
    # Readable part: `key=value` for single values, `key` alone for swept ones (a,b / quoted lists).
    words = [config_name] if config_name and config_name != "config" else []
    for o in items:
        key, _, value = o.lstrip("+~").partition("=")
        words.append(key if ("," in value or not value) else f"{key}={value}")
    slug = re.sub(r"[^A-Za-z0-9._=+-]+", "_", "_".join(words)).strip("_")
    if len(slug) > 60:
        slug = slug[:60].rsplit("_", 1)[0]
    slug = slug.rstrip("_.=") or "default"
    return f"{slug}-{digest}"


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("pa_sweep_name"):
        OmegaConf.register_new_resolver("pa_sweep_name", sweep_name)


class CellSweeper(BasicSweeper):
    """Hydra's BasicSweeper, minus composing every job twice (the launcher validates them all), minus
    its writes before the launcher has planned (the launcher writes ``multirun.yaml`` with the plan, so
    a dry run or a refused plan writes nothing), with one summary and one exit code for all batches."""

    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[Dict[str, str]] = None) -> None:
        # Not super().__init__: Hydra's plugin scan re-executes basic_sweeper.py, and its
        # ``super(BasicSweeper, self)`` then names a newer class than the one subclassed here.
        self.overrides = None
        self.batch_index = 0
        self.max_batch_size = max_batch_size
        self.params = dict(params or {})
        self.hydra_context = None
        self.config = None
        self.launcher = None

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        return None

    def sweep(self, arguments: List[str]) -> Any:
        """Every batch runs (a failed cell never stops the sweep); then the command fails if any cell of
        any batch is not DONE, for every entry point (``python -m proxyattention.train -m`` too)."""
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.core.override_parser.types import IntervalSweep

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        ours = isinstance(self.launcher, SweepLauncher)
        if CELL_LAUNCHERS_ONLY and not ours:
            raise SweepError(FOREIGN_LAUNCHER)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(self._parse_config() + list(arguments))
        for o in overrides:
            if isinstance(o.value(), IntervalSweep):
                raise SweepError(
                    f"{o.input_line}: interval() is a search range for an adaptive sweeper; add "
                    "hydra/sweeper=optuna (pip install -e '.[optuna]'), or give the grid a list "
                    "(a,b,c), range(start,stop,step) or choice(a,b)")
        self.overrides = self.split_arguments(overrides, self.max_batch_size)
        if not ours:  # Hydra's own launchers: Hydra's own record of the sweep, as BasicSweeper writes it
            sweep_dir = Path(self.config.hydra.sweep.dir)
            sweep_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        if ours:
            self.launcher.defer_summary = True  # one summary for the whole command, printed below
            self.launcher.adaptive = False
        returns: List[Sequence[JobReturn]] = []
        initial_job_idx = 0
        while not self.is_done():
            batch = self.get_job_batch()
            results = self.launcher.launch(batch, initial_job_idx=initial_job_idx)
            initial_job_idx += len(batch)
            returns.append(results)
        if ours:
            self.launcher.print_summary()
        code = EXIT_CODE if ours else max((_job_code(r) for rs in returns for r in rs), default=0)
        if code:  # one line, no traceback: the summary above lists the cells
            print("error: not every cell of this sweep is DONE (the summary above lists them); re-issue "
                  "the command to run only those", file=sys.stderr)
            sys.exit(code)
        return returns


class SweepError(CompactHydraException):
    """A sweep that cannot start (printed as one line by Hydra, exit code 1)."""


def _job_code(ret: JobReturn) -> int:
    """A job of a launcher that is not ours (``hydra/launcher=basic``): 1 if it failed."""
    return 1 if ret.status == JobStatus.FAILED else 0


class SweepLauncher(Launcher):
    """Plan the jobs into cells, then hand them to ``launcher.<backend>.run``."""

    backend = "local"

    def __init__(self, **params: Any) -> None:
        self.params = params
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.task_function: Optional[TaskFunction] = None
        self.defer_summary = False  # CellSweeper prints one summary after the last batch
        self.adaptive = True  # the sweeper reads each batch's job returns (False: CellSweeper)
        self.on_plan: Optional[Callable[[Any], None]] = None  # called with each batch's plan before it runs
        self._records: dict[str, Any] = {}  # every cell of this command, over all batches
        self._statuses: dict[str, Any] = {}  # their final statuses, as the local backend last saw them

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def _compose(self, overrides: List[str]) -> DictConfig:
        assert self.hydra_context is not None and self.config is not None
        return self.hydra_context.config_loader.load_sweep_config(
            master_config=self.config, sweep_overrides=overrides)

    def check_options(self) -> Any:
        """The backend module, once it has accepted ``hydra.launcher`` (else a one-line SweepError)."""
        assert self.config is not None
        backend = importlib.import_module(f"launcher.{self.backend}")
        try:
            backend.check_options(self.config.hydra.launcher, adaptive=self.adaptive)
        except ValueError as e:
            raise SweepError(str(e)) from None
        return backend

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        global EXIT_CODE
        from launcher import plan as planning
        from launcher import taskcell

        assert self.config is not None
        if not taskcell.is_trial_config(self.config):  # another Hydra app: its task function, as cells
            try:
                returns, code = taskcell.launch(self, job_overrides, initial_job_idx)
            except taskcell.Refused as e:
                raise SweepError(str(e)) from None
            EXIT_CODE = max(EXIT_CODE, code)
            return returns
        launcher_cfg = self.config.hydra.launcher
        backend = self.check_options()  # refused before anything is planned or written
        sweep_dir = Path(self.config.hydra.sweep.dir)
        dry_run = bool(launcher_cfg.get("dry_run", False))
        jobs = [list(j) for j in job_overrides]
        t0 = time.perf_counter()
        fp = planning.fingerprint(_config_dirs(self.config))
        try:
            plan = planning.cached_plan(sweep_dir, jobs, fp)
        except manifest.PlanFileError as e:
            raise SweepError(str(e)) from None
        if plan is None:
            bar = _PlanProgress(len(jobs))
            gc.disable()  # planning makes many small dicts and no cycles: collecting over them costs a third
            try:
                plan = planning.plan_sweep(jobs, self._compose, sweep_dir, progress=bar.update)
            finally:
                gc.enable()
                bar.close()
            # Slurm cells run with the hub offline (launcher.slurm.cells_hub_offline): their weights
            # must be in the cache when the sweep is submitted, whatever the login node can reach.
            offline = backend.cells_hub_offline() if hasattr(backend, "cells_hub_offline") else None
            planning.check_models(plan, hub_offline=offline)
            if not dry_run:  # a dry run writes nothing
                store_opt = launcher_cfg.get("store")
                store = Path(store_opt).absolute() if store_opt else None
                made = _writable(store, "hydra.launcher.store") if store is not None else []
                try:
                    _writable(sweep_dir, "hydra.sweep.dir")
                except SweepError:
                    _remove_empty(made)  # a refusal leaves no folder behind
                    raise
                task = OmegaConf.to_container(self.config.hydra.overrides.task, resolve=False)
                try:
                    new = planning.write_plan_files(plan, task, fingerprint=fp,  # type: ignore[arg-type]
                                                    store=store)
                    # The sweep's Hydra config, as Hydra records it: written when the sweep's plan changes.
                    fileio.write_text_atomic(sweep_dir / "multirun.yaml", OmegaConf.to_yaml(self.config))
                except OSError as e:
                    if not manifest.is_write_failure(e):
                        raise
                    raise SweepError(manifest.write_failure_line(e)) from None
            else:
                new = 0
            log.debug("planned %d cells (%d new) in %.2fs", len(plan.cells), new, time.perf_counter() - t0)
        records = [c.record for c in plan.cells]
        for r in records:
            self._records.setdefault(r.id, r)
        if self.on_plan is not None:
            self.on_plan(plan)
        hooks = None if dry_run else _JobCallbacks.of(self, plan)
        try:
            code = backend.run(sweep_dir, records, launcher_cfg, summary=not self.defer_summary, hooks=hooks,
                               collect=self._statuses)
        except OSError as e:  # the sweep folder or the store takes no write: the backend stopped cleanly
            if not manifest.is_write_failure(e):
                raise
            EXIT_CODE = max(EXIT_CODE, 1)
            if self.defer_summary:
                self.print_summary()
            raise SweepError(manifest.write_failure_line(e)) from None
        EXIT_CODE = max(EXIT_CODE, code)  # over all batches
        if dry_run and self.adaptive:  # an adaptive sweeper: later trials depend on results
            print("dry run: an adaptive sweeper chooses its next trials from the results of these; "
                  "only its first batch is shown")
            sys.exit(0)
        name = str(self.config.hydra.job.name)
        if not self.adaptive:  # the grid sweeper reads no job return: skip reading every cell again
            root = str(cellstate.cells_root(sweep_dir))
            return [JobReturn(overrides=j, working_dir=f"{root}/{cid}", task_name=name, status=JobStatus.UNKNOWN)
                    for j, cid in zip(jobs, plan.job_cells)]
        return job_returns(sweep_dir, jobs, plan.job_cells, name, launcher_cfg,
                           {c.id: c.record.baseline for c in plan.cells})

    def print_summary(self) -> None:
        """One summary table of every cell this command planned (all batches)."""
        from launcher.console import Console

        # Only a backend that saw its cells finish has statuses to show (not a dry run, not a submitter).
        if self.config is None or not self._statuses:
            return
        records = list(self._records.values())
        Console(records).summary(records, self._statuses, Path(self.config.hydra.sweep.dir))


class CellNotDone(CompactHydraException):
    """The ``return_value`` of a job whose cell did not finish DONE (Hydra raises it when read)."""


def job_returns(sweep_dir: Path, jobs: Sequence[Sequence[str]], job_cells: Sequence[str], task_name: str,
                launcher_cfg: Any = None, baselines: Optional[dict[str, Optional[str]]] = None) -> list[JobReturn]:
    """One ``JobReturn`` per Hydra job: COMPLETED with the cell's objective (launcher.objective) when its
    cell is DONE, else FAILED, so adaptive sweepers see a failed cell as a failed trial."""
    from launcher import objective

    cfg = launcher_cfg if launcher_cfg is not None else {}
    name = cfg.get("objective") or objective.DEFAULT
    gain = bool(cfg.get("objective_vs_baseline", False))
    out = []
    for overrides, cid in zip(jobs, job_cells):
        cell = cellstate.cell_dir(sweep_dir, cid)
        status = cellstate.read_status(cell)
        ret = JobReturn(overrides=list(overrides), working_dir=str(cell), task_name=task_name)
        base = (baselines or {}).get(cid)
        base_status = cellstate.read_status(cellstate.cell_dir(sweep_dir, base)) if gain and base else None
        if status.state == cellstate.CellState.DONE and (base_status is None
                                                         or base_status.state == cellstate.CellState.DONE):
            ret.status = JobStatus.COMPLETED
            if gain:
                ret.return_value = objective.zero(name) if base is None else objective.value(
                    cell, name, cellstate.cell_dir(sweep_dir, base))
            else:
                ret.return_value = objective.value(cell, name)
        else:
            ret.status = JobStatus.FAILED
            failed, fstatus = (cid, status) if status.state != cellstate.CellState.DONE else (base, base_status)
            assert fstatus is not None
            ret.return_value = CellNotDone(f"cell {failed} is {fstatus.state.value}: "
                                           f"{cellstate.error_headline(fstatus.error) or 'not run'}")
        out.append(ret)
    return out


class _JobCallbacks:
    """Hydra's ``hydra.callbacks`` ``on_job_start`` / ``on_job_end``, fired for each cell the local
    backend runs, in the launcher process (a cell is not a Hydra job of its own). The config they get is
    the sweep's config with the cell's trial groups, ``hydra.job.id`` the cell id, ``hydra.job.num`` its
    job number and ``hydra.runtime.output_dir`` the cell folder."""

    def __init__(self, launcher: "SweepLauncher", plan: Any) -> None:
        assert launcher.config is not None and launcher.hydra_context is not None
        self.config = launcher.config
        self.task_function = launcher.task_function
        self.plan = plan
        self.callbacks = launcher.hydra_context.callbacks  # the instances Hydra made for this command
        self.job_num = {cid: i for i, cid in reversed(list(enumerate(plan.job_cells)))}
        self.records = {c.id: c.record for c in plan.cells}
        self.baselines = {cid: r.baseline for cid, r in self.records.items()}

    @classmethod
    def of(cls, launcher: "SweepLauncher", plan: Any) -> Optional["_JobCallbacks"]:
        assert launcher.config is not None
        return cls(launcher, plan) if launcher.config.hydra.get("callbacks") else None

    def job_config(self, cid: str) -> DictConfig:
        from omegaconf import open_dict

        cell = cellstate.cell_dir(self.plan.sweep_dir, cid)
        trial = OmegaConf.load(cell / fileio.CONFIG)
        cfg = OmegaConf.merge(OmegaConf.masked_copy(self.config, ["hydra"]), trial)
        record = self.records.get(cid)
        with open_dict(cfg):
            cfg.hydra.job.id = cid
            cfg.hydra.job.num = self.job_num.get(cid, -1)
            cfg.hydra.runtime.output_dir = str(cell)
            cfg.hydra.overrides.task = list(record.overrides) if record is not None else []
        return cfg

    def start(self, cid: str) -> None:
        self.callbacks.on_job_start(config=self.job_config(cid), task_function=self.task_function)

    def end(self, cid: str) -> None:
        cfg = self.job_config(cid)
        ret = job_returns(self.plan.sweep_dir, [cfg.hydra.overrides.task], [cid], str(cfg.hydra.job.name),
                          self.config.hydra.launcher, self.baselines)[0]
        self.callbacks.on_job_end(config=cfg, job_return=ret)


def _writable(folder: Path, key: str) -> list[Path]:
    """Create ``folder`` if needed and check a file can be written in it, or refuse in one line (removing
    the folders it created). Returns the folders it created, outermost first."""
    import tempfile

    made = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        _remove_empty(made)
        raise SweepError(f"{key}={folder} cannot be written ({e.strerror or e}); choose a writable folder "
                         f"with {key}=DIR") from None
    return made


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders a refused launch created (innermost first; only while they are empty)."""
    for p in reversed(folders):
        try:
            p.rmdir()
        except OSError:
            pass


def _config_dirs(config: DictConfig) -> list[Path]:
    """Folders of YAML files the composition reads (file:// config sources)."""
    dirs = []
    for src in config.hydra.runtime.config_sources:
        if src.schema == "file":
            dirs.append(Path(src.path))
    return dirs


class _PlanProgress:
    """A progress bar for planning big sweeps (only shown on a terminal, and only if slow)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar = None
        self.t0 = time.perf_counter()

    def update(self, i: int) -> None:
        if self.bar is None:
            if i % 256 or time.perf_counter() - self.t0 < 2.0:
                return
            import sys

            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=i, desc="planning", unit="job", file=sys.stderr,
                            disable=None, leave=False)
        else:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
