"""The Hydra side of a sweep: a launcher that turns Hydra's jobs into cells, and a sweeper.

Hydra's ``BasicSweeper`` expands the grid (``key=a,b``, ``hydra.sweeper.params``) into jobs and hands
them to a launcher's ``launch()``. :class:`SweepLauncher.launch` hands the batch to the app whose jobs
these are (:mod:`launcher.apps`): it composes every job, names its cells (an app may add cells, as this
project's trials add paired baselines), writes the cell folders and the sweep definition, then gives
the cells to a *backend*: a module ``launcher.<backend>`` with a function ``run(sweep_dir, records,
launcher_cfg) -> exit code`` (``launcher.local``; ``launcher.slurm``). Nothing runs in the Hydra
process itself.

Hydra only instantiates plugins defined under the ``hydra_plugins`` package, so the classes Hydra
sees are two-line subclasses in ``hydra_plugins/proxyattention_launcher``; the code lives here (and, for
the adaptive sweeper ``hydra/sweeper=optuna``, in :mod:`launcher.optuna_sweeper`).

:class:`CellSweeper` is ``BasicSweeper`` without its pre-launch composition of every job (~0.1 s a
job through Hydra): the app's launch composes every job anyway (this project's trials validate them
all, faster, before any cell starts).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from launcher.cellproc import CELL_MODULE

log = logging.getLogger(__name__)

# The exit code of the last launch; ``python -m launcher`` exits with it (Hydra itself returns None).
EXIT_CODE = 0
# Set by ``python -m launcher``: jobs must become cells, so a launcher that is not ours is refused.
CELL_LAUNCHERS_ONLY = False
# What to run instead, said when a launcher that is not ours is chosen (set by `python -m launcher`).
FOREIGN_LAUNCHER_HINT = ""


def foreign_launcher() -> str:
    """The one line refusing a launcher that is not ours in ``python -m launcher``."""
    return ("python -m launcher runs sweeps through the launcher's own launchers only (hydra/launcher=local, "
            f"slurm or slurm_v100){'; ' + FOREIGN_LAUNCHER_HINT if FOREIGN_LAUNCHER_HINT else ''}")


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
    # What each job returns to an adaptive sweeper (a metric of result.json; a list: one per objective;
    # null: the app's default, launcher.apps.App.default_objective).
    objective: Any = None
    objective_vs_baseline: bool = False  # return proxy − paired baseline of the objective instead


@dataclass
class CellSweeperConf:
    _target_: str = "hydra_plugins.proxyattention_launcher.CellSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="hydra/launcher", name="local_schema", node=LocalLauncherConf, provider="launcher")
    cs.store(group="hydra/sweeper", name="cells", node=CellSweeperConf, provider="launcher")
    # conf/config.yaml's `sweeper_default`: hydra/sweeper=cells unless a saved sweep or the command line
    # chooses another. An override in the primary config itself would win over a saved sweep's; one in a
    # config it includes is applied after the saved sweep's (Hydra expands the defaults last to first).
    cs.store(name="sweeper_default", node={"defaults": [{"override /hydra/sweeper": "cells"}]},
             provider="launcher")


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
        any batch is not DONE, for every entry point (an app's own ``-m`` command too)."""
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.core.override_parser.types import IntervalSweep

        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        ours = isinstance(self.launcher, SweepLauncher)
        if CELL_LAUNCHERS_ONLY and not ours:
            raise SweepError(foreign_launcher())
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


def note_exit_code(code: int) -> None:
    """Record a batch's exit code: ``python -m launcher`` exits with the worst of the command's batches."""
    global EXIT_CODE
    EXIT_CODE = max(EXIT_CODE, code)


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
        from launcher import apps

        app = apps.for_config(self.config)
        try:
            backend.check_options(self.config.hydra.launcher, adaptive=self.adaptive)
            if app is not None:
                app.check_options(self.config.hydra.launcher)
        except ValueError as e:
            raise SweepError(str(e)) from None
        return backend

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Hand the batch to the app whose jobs these are (:func:`launcher.apps.for_config`); any other app's
        jobs run its task function, each job a cell (:func:`launcher.taskcell.launch`)."""
        from launcher import apps, taskcell

        assert self.config is not None
        app = apps.for_config(self.config)
        launch = app.launch if app is not None else taskcell.launch
        try:
            returns, code = launch(self, job_overrides, initial_job_idx)
        except ValueError as e:  # a batch that cannot start, said in one line
            raise SweepError(str(e)) from None
        note_exit_code(code)
        return returns

    def print_summary(self) -> None:
        """One summary table of every cell this command planned (all batches)."""
        from launcher.console import Console

        # Only a backend that saw its cells finish has statuses to show (not a dry run, not a submitter).
        if self.config is None or not self._statuses:
            return
        records = list(self._records.values())
        Console(records).summary(records, self._statuses, Path(self.config.hydra.sweep.dir))


def writable(folder: Path, key: str) -> list[Path]:
    """Create ``folder`` if needed and check a file can be written in it, or refuse in one line (removing
    the folders it created). Returns the folders it created, outermost first."""
    import tempfile

    made = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        remove_empty(made)
        raise SweepError(f"{key}={folder} cannot be written ({e.strerror or e}); choose a writable folder "
                         f"with {key}=DIR") from None
    return made


def remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders a refused launch created (innermost first; only while they are empty)."""
    for p in reversed(folders):
        try:
            p.rmdir()
        except OSError:
            pass
