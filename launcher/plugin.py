"""The Hydra side of a sweep: a launcher that turns Hydra's jobs into cells, and a sweeper.

Hydra's ``BasicSweeper`` expands the grid (``key=a,b``, ``hydra.sweeper.params``) into jobs and hands
them to a launcher's ``launch()``. :class:`SweepLauncher.launch` plans every job (compose, validate,
add paired baselines, cell ids — :mod:`launcher.plan`), writes the cell folders and the sweep
definition, then gives the cells to a *backend*: a module ``launcher.<backend>`` with a function
``run(sweep_dir, records, launcher_cfg) -> exit code`` (``launcher.local``; ``launcher.slurm``).
Nothing runs in the Hydra process itself.

Hydra only instantiates plugins defined under the ``hydra_plugins`` package, so the classes Hydra
sees are two-line subclasses in ``hydra_plugins/proxyattention_launcher``; the code lives here.

:class:`CellSweeper` is ``BasicSweeper`` without its pre-launch composition of every job (~0.1 s a
job through Hydra): :func:`launcher.plan.plan_sweep` validates every job anyway, faster, before any
cell starts.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from launcher.cellproc import CELL_MODULE

log = logging.getLogger(__name__)

# The exit code of the last launch; ``python -m launcher`` exits with it (Hydra itself returns None).
EXIT_CODE = 0


@dataclass
class LocalLauncherConf:
    """``hydra/launcher=local``: run cells as local subprocesses (see launcher.local)."""

    _target_: str = "hydra_plugins.proxyattention_launcher.LocalLauncher"
    workers: int = 1  # cells at once; each gets its own GPU round-robin when GPUs exist
    timeout_min: Optional[float] = None  # per-cell wall-clock limit; kills the process group -> TIMEOUT
    rerun: str = "not_done"  # not_done | failed (FAILED/TIMEOUT/CANCELLED only) | all (force)
    dry_run: bool = False  # list the cells and which would run; run nothing
    threads_per_cell: int = 0  # OMP_NUM_THREADS of each cell; 0: cores // workers
    gpus: Optional[str] = None  # "0,1": GPUs to use; null: CUDA_VISIBLE_DEVICES, else nvidia-smi -L
    heartbeat_s: float = 10.0  # how often a running cell's status and claim are refreshed
    stale_after_s: float = 120.0  # a claim from another host without heartbeat this long is taken over
    cell_module: str = CELL_MODULE  # run as `python -m <cell_module> CELL_DIR`
    store: Optional[str] = "outputs/cells"  # the cell store every sweep links its cells from (null: none)


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


def sweep_name(task_overrides: Any) -> str:
    """The default sweep folder name: readable overrides plus a hash of them, sorted.

    The same command line (in any order) names the same folder, so re-issuing it resumes.
    """
    items = sorted(str(o) for o in (task_overrides or []))
    digest = hashlib.sha256("\n".join(items).encode()).hexdigest()[:10]
    # Readable part: `key=value` for single values, `key` alone for swept ones (a,b / quoted lists).
    words = []
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
    """Hydra's BasicSweeper, minus composing every job twice (the launcher validates them all)."""

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
        returns = BasicSweeper.sweep(self, arguments)
        if EXIT_CODE:  # one line, no traceback: the summary above already lists the cells
            print("error: not every cell of this sweep is DONE (the summary above lists them); re-issue "
                  "the command to run only those", file=sys.stderr)
            sys.exit(EXIT_CODE)
        return returns


class SweepLauncher(Launcher):
    """Plan the jobs into cells, then hand them to ``launcher.<backend>.run``."""

    backend = "local"

    def __init__(self, **params: Any) -> None:
        self.params = params
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context

    def _compose(self, overrides: List[str]) -> DictConfig:
        assert self.hydra_context is not None and self.config is not None
        return self.hydra_context.config_loader.load_sweep_config(
            master_config=self.config, sweep_overrides=overrides)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        global EXIT_CODE
        from launcher import plan as planning

        assert self.config is not None
        sweep_dir = Path(self.config.hydra.sweep.dir)
        jobs = [list(j) for j in job_overrides]
        t0 = time.perf_counter()
        fp = planning.fingerprint(_config_dirs(self.config))
        plan = planning.cached_plan(sweep_dir, jobs, fp)
        if plan is None:
            bar = _PlanProgress(len(jobs))
            try:
                plan = planning.plan_sweep(jobs, self._compose, sweep_dir, progress=bar.update)
            finally:
                bar.close()
            task = OmegaConf.to_container(self.config.hydra.overrides.task, resolve=False)
            if not self.config.hydra.launcher.get("dry_run", False):  # a dry run writes nothing
                store = self.config.hydra.launcher.get("store")
                new = planning.write_plan_files(plan, task, fingerprint=fp,  # type: ignore[arg-type]
                                                store=Path(store).absolute() if store else None)
            else:
                new = 0
            log.debug("planned %d cells (%d new) in %.2fs", len(plan.cells), new, time.perf_counter() - t0)
        records = [c.record for c in plan.cells]
        backend = importlib.import_module(f"launcher.{self.backend}")
        EXIT_CODE = max(EXIT_CODE, backend.run(sweep_dir, records, self.config.hydra.launcher))  # all batches
        root, name = str(sweep_dir / "cells"), str(self.config.hydra.job.name)
        return [JobReturn(overrides=jobs[i], working_dir=f"{root}/{cid}", task_name=name,
                          status=JobStatus.COMPLETED, _return_value=cid)
                for i, cid in enumerate(plan.job_cells)]


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
