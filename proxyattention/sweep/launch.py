"""The launch of a batch of Proxy Attention trials (:meth:`proxyattention.sweep.app.TrialApp.launch`):
plan, write the cells, run them with the backend, and what each job returns to Hydra."""

from __future__ import annotations

import gc
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from launcher import cellstate, fileio, manifest, plugin
from proxyattention.sweep import DEFAULT_OBJECTIVE

log = logging.getLogger(__name__)


def launch_trials(app: Any, launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> tuple[list, int]:
    """Plan the batch (validated, baselines added), write its cells, run them with the backend
    (which adds ``app``'s lines to a dry run)."""
    from proxyattention.sweep import plan as planning

    assert launcher.config is not None
    launcher_cfg = launcher.config.hydra.launcher
    backend = launcher.check_options()  # refused before anything is planned or written
    sweep_dir = Path(launcher.config.hydra.sweep.dir)
    dry_run = bool(launcher_cfg.get("dry_run", False))
    jobs = [list(j) for j in job_overrides]
    t0 = time.perf_counter()
    fp = planning.fingerprint(config_dirs(launcher.config))
    try:
        plan = planning.cached_plan(sweep_dir, jobs, fp)
    except manifest.PlanFileError as e:
        raise plugin.SweepError(str(e)) from None
    if plan is None:
        bar = PlanProgress(len(jobs))
        gc.disable()  # planning makes many small dicts and no cycles: collecting over them costs a third
        try:
            plan = planning.plan_sweep(jobs, launcher._compose, sweep_dir, progress=bar.update)
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
            made = plugin.writable(store, "hydra.launcher.store") if store is not None else []
            try:
                plugin.writable(sweep_dir, "hydra.sweep.dir")
            except plugin.SweepError:
                plugin.remove_empty(made)  # a refusal leaves no folder behind
                raise
            task = OmegaConf.to_container(launcher.config.hydra.overrides.task, resolve=False)
            try:
                new = planning.write_plan_files(plan, task, fingerprint=fp,  # type: ignore[arg-type]
                                                store=store)
                # The sweep's Hydra config, as Hydra records it: written when the sweep's plan changes.
                fileio.write_text_atomic(sweep_dir / "multirun.yaml", OmegaConf.to_yaml(launcher.config))
            except OSError as e:
                if not manifest.is_write_failure(e):
                    raise
                raise plugin.SweepError(manifest.write_failure_line(e)) from None
        else:
            new = 0
        log.debug("planned %d cells (%d new) in %.2fs", len(plan.cells), new, time.perf_counter() - t0)
    records = [c.record for c in plan.cells]
    for r in records:
        launcher._records.setdefault(r.id, r)
    if launcher.on_plan is not None:
        launcher.on_plan(plan)
    hooks = None if dry_run else JobCallbacks.of(launcher, plan)
    try:
        code = backend.run(sweep_dir, records, launcher_cfg, summary=not launcher.defer_summary, hooks=hooks,
                           collect=launcher._statuses, app=app)
    except OSError as e:  # the sweep folder or the store takes no write: the backend stopped cleanly
        if not manifest.is_write_failure(e):
            raise
        plugin.note_exit_code(1)
        if launcher.defer_summary:
            launcher.print_summary()
        raise plugin.SweepError(manifest.write_failure_line(e)) from None
    if dry_run and launcher.adaptive:  # an adaptive sweeper: later trials depend on results
        print("dry run: an adaptive sweeper chooses its next trials from the results of these; "
              "only its first batch is shown")
        sys.exit(0)
    name = str(launcher.config.hydra.job.name)
    if not launcher.adaptive:  # the grid sweeper reads no job return: skip reading every cell again
        root = str(cellstate.cells_root(sweep_dir))
        return [JobReturn(overrides=j, working_dir=f"{root}/{cid}", task_name=name, status=JobStatus.UNKNOWN)
                for j, cid in zip(jobs, plan.job_cells)], code
    return job_returns(sweep_dir, jobs, plan.job_cells, name, launcher_cfg,
                       {c.id: c.record.baseline for c in plan.cells}), code


class CellNotDone(CompactHydraException):
    """The ``return_value`` of a job whose cell did not finish DONE (Hydra raises it when read)."""


def job_returns(sweep_dir: Path, jobs: Sequence[Sequence[str]], job_cells: Sequence[str], task_name: str,
                launcher_cfg: Any = None, baselines: Optional[dict[str, Optional[str]]] = None) -> list[JobReturn]:
    """One ``JobReturn`` per Hydra job: COMPLETED with the cell's objective (launcher.objective) when its
    cell is DONE, else FAILED, so adaptive sweepers see a failed cell as a failed trial."""
    from launcher import objective

    cfg = launcher_cfg if launcher_cfg is not None else {}
    name = cfg.get("objective") or DEFAULT_OBJECTIVE
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


class JobCallbacks:
    """Hydra's ``hydra.callbacks`` ``on_job_start`` / ``on_job_end``, fired for each cell the local
    backend runs, in the launcher process (a cell is not a Hydra job of its own). The config they get is
    the sweep's config with the cell's trial groups, ``hydra.job.id`` the cell id, ``hydra.job.num`` its
    job number and ``hydra.runtime.output_dir`` the cell folder."""

    def __init__(self, launcher: Any, plan: Any) -> None:
        assert launcher.config is not None and launcher.hydra_context is not None
        self.config = launcher.config
        self.task_function = launcher.task_function
        self.plan = plan
        self.callbacks = launcher.hydra_context.callbacks  # the instances Hydra made for this command
        self.job_num = {cid: i for i, cid in reversed(list(enumerate(plan.job_cells)))}
        self.records = {c.id: c.record for c in plan.cells}
        self.baselines = {cid: r.baseline for cid, r in self.records.items()}

    @classmethod
    def of(cls, launcher: Any, plan: Any) -> Optional["JobCallbacks"]:
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


def config_dirs(config: DictConfig) -> list[Path]:
    """Folders of YAML files the composition reads (file:// config sources)."""
    dirs = []
    for src in config.hydra.runtime.config_sources:
        if src.schema == "file":
            dirs.append(Path(src.path))
    return dirs


class PlanProgress:
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
