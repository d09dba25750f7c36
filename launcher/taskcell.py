"""Any Hydra app's task function as a cell: run by the local or Slurm backend, kept in the store, never
rerun DONE.

When no installed app launches the sweep itself (:func:`launcher.apps.for_config`: not this project's
trials), :func:`launch` turns each Hydra job into a cell of its own:

- the job's config is composed as Hydra's launchers compose it (``hydra.job.num`` continues across
  batches from ``initial_job_idx``); its cell id is a hash of the task function (module, name, source)
  and of the task part of the config (resolved, without ``hydra``): :func:`cell_id`. A job whose cell is
  DONE in the store (``hydra.launcher.store``) is not run again, whatever sweep planned it; its stored
  return value is handed back;
- the task function and the job's config (with the state of Hydra's singletons and the app's custom
  resolvers) are pickled with cloudpickle into the cell folder (``.job.pkl``), as submitit does;
- the backend runs ``python -m launcher.taskcell CELL_DIR`` in a process of its own: the local one
  (:mod:`launcher.local`) here, the Slurm one (:mod:`launcher.slurm`, ``hydra/launcher=slurm``) in an
  array task on a node (:class:`launcher.slurm_job.CellJob`). :func:`main` unpickles the job and calls
  Hydra's ``run_job`` (the job folder as ``hydra.sweep.dir``/``hydra.sweep.subdir`` say, ``.hydra/``
  files, job logging, job callbacks), then
  writes the ``JobReturn`` (``jobreturn.pkl``) and the files the store judges a cell by: ``result.json``
  (DONE) or ``error.json`` (FAILED, with the exception's last line).

With Slurm the launch submits the cells that are neither DONE nor queued or running, prints the job ids
and returns (exit code 0): a job whose cell a Slurm job owns gets a :class:`QueuedJobReturn` (no value
yet). With ``hydra.launcher.wait=true`` it waits for those cells to end and returns each job's own
``JobReturn``, as with the local backend.

A cell folder holds ``config.yaml`` (the task config it is identified by), ``.job.pkl``, ``status.json``,
``result.json`` or ``error.json``, ``jobreturn.pkl`` and the process's ``stdout.log``/``stderr.log``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException

JOB = ".job.pkl"  # hidden: a forced rerun moves a cell's files aside but its dot-files
JOB_RETURN = "jobreturn.pkl"
MODULE = "launcher.taskcell"  # the cell module of these cells: `python -m launcher.taskcell CELL_DIR`
BACKENDS = ("local", "slurm")  # hydra/launcher=local runs the cells here; slurm submits them (slurm_v100 too)


def profile_default(config: Any, key: str) -> Any:
    """The value of ``hydra.launcher.<key>`` in the chosen launcher option's own file, as the ConfigStore holds
    it (None if it holds none): what the command line or the app did not choose."""
    from hydra.core.config_store import ConfigStore

    choice = config.hydra.runtime.choices.get("hydra/launcher")
    node = ConfigStore.instance().repo.get("hydra", {}).get("launcher", {}).get(f"{choice}.yaml")
    try:
        return node.node.get(key) if node is not None else None
    except AttributeError:  # a structured config: its class default
        return None


def task_identity(task_function: Any) -> dict:
    """What names a task function in a cell id: its module, qualified name and a hash of its source."""
    fn = inspect.unwrap(task_function) if callable(task_function) else task_function
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    try:
        code = inspect.getsource(fn)
    except (OSError, TypeError):
        c = getattr(fn, "__code__", None)
        code = repr((c.co_code, c.co_consts)) if c is not None else name
    return {"function": name, "source": hashlib.sha256(code.encode()).hexdigest()[:16]}


def task_part(config: Any) -> dict:
    """The task part of a composed config: without ``hydra``, resolved where it can be (a value that
    cannot be resolved in the launcher, e.g. a missing ``???``, is kept as written)."""
    from omegaconf import OmegaConf

    masked = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
    try:
        return OmegaConf.to_container(masked, resolve=True)  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 (identity only: the job itself reports what cannot be resolved)
        return OmegaConf.to_container(masked, resolve=False)  # type: ignore[return-value]


def cell_id(task_function: Any, task_config: dict) -> str:
    """A 12-hex-digit id of one job: the same task function and task config give the same id (hashed
    by :func:`launcher.fileio.digest`; values JSON cannot hold as text)."""
    from launcher import fileio

    job = json.loads(json.dumps({"task": task_identity(task_function), "config": task_config}, default=str))
    return fileio.digest(job)


# ---------------------------------------------------------------------------------------------------
# The launcher side


def _custom_resolvers() -> dict:
    """OmegaConf resolvers the app registered (not OmegaConf's own), for the cell process."""
    from omegaconf.basecontainer import BaseContainer

    return {k: v for k, v in BaseContainer._resolvers.items() if not k.startswith("oc.")}


def _make_cell(sweep_dir: Path, cid: str, store: Optional[str]) -> Path:
    """The cell folder ``SWEEP/cells/<id>``: with a store, a link to ``STORE/<id>`` (shared by sweeps)."""
    from launcher import cellstate

    cell = cellstate.cell_dir(sweep_dir, cid)
    cell.parent.mkdir(parents=True, exist_ok=True)
    if os.path.isdir(cell):
        return cell
    if os.path.islink(cell):  # a dangling link: its store entry is gone, make it again
        os.unlink(cell)
    if store is None:
        cell.mkdir(exist_ok=True)
        return cell
    target = Path(store) / cid
    target.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(os.path.realpath(target), os.path.realpath(cell.parent))
    try:
        os.symlink(rel, cell, target_is_directory=True)
    except FileExistsError:
        pass
    return cell


def _write_pickle(path: Path, obj: Any, fsync: bool = False) -> None:
    import cloudpickle

    from launcher.fileio import atomic_file

    blob = cloudpickle.dumps(obj)  # before the file is opened: an object that cannot be pickled writes nothing
    with atomic_file(path, "wb", fsync=fsync) as f:
        f.write(blob)


def _read_pickle(path: Path) -> Any:
    import pickle

    with open(path, "rb") as f:
        return pickle.load(f)


class Refused(ValueError):
    """A launch that cannot start or go on, said in one line (the launcher raises it as a SweepError)."""


class JobNotDone(CompactHydraException):
    """The ``return_value`` of a job whose cell did not finish DONE (Hydra raises it when read)."""


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> tuple[list, int]:
    """Run the jobs of one batch of a foreign app as cells (the local backend, or submit them to Slurm):
    one JobReturn per job, and the backend's exit code. Raises :class:`Refused` for options or folders
    that cannot run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.singleton import Singleton
    from hydra.core.utils import configure_log, setup_globals
    from omegaconf import OmegaConf, open_dict, read_write

    from launcher import cellstate, fileio, manifest
    from launcher.manifest import CellRecord

    config, task_function = launcher.config, launcher.task_function
    if launcher.backend not in BACKENDS:
        raise Refused(f"hydra/launcher={launcher.backend} cannot run another app's jobs; use "
                      + " or ".join(f"hydra/launcher={b}" for b in BACKENDS))
    backend = importlib.import_module(f"launcher.{launcher.backend}")
    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    opts: dict = OmegaConf.to_container(config.hydra.launcher, resolve=True)  # type: ignore[assignment]
    opts["cell_module"] = MODULE
    slurm = launcher.backend == "slurm"
    if slurm and opts.get("job_name") in (profile_default(config, "job_name"), backend.SlurmOptions.job_name):
        opts["job_name"] = str(config.hydra.job.name)  # the Slurm jobs of another app: named after it
    try:
        backend.check_options(opts)
    except ValueError as e:
        raise Refused(str(e)) from None
    store = manifest.store_dir(opts.get("store"))
    dry_run = bool(opts.get("dry_run", False))
    state = Singleton.get_state()
    resolvers = _custom_resolvers()
    task_name = str(config.hydra.job.name)

    records: dict[str, CellRecord] = {}
    jobs = []  # (overrides, cell id, composed config)
    try:
        for idx, overrides in enumerate(job_overrides):
            num = initial_job_idx + idx
            cfg = launcher._compose(list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.num = num
                cfg.hydra.job.id = num
            HydraConfig.instance().set_config(cfg)  # for ${hydra:...} in the task config
            plain = task_part(cfg)
            cid = cell_id(task_function, plain)
            with read_write(cfg.hydra), open_dict(cfg):
                cfg.hydra.job.id = cid
            jobs.append((list(overrides), cid, cfg))
            if cid in records:
                continue
            records[cid] = CellRecord(id=cid, overrides=list(overrides), role="job")
            if dry_run:  # a dry run writes nothing
                continue
            cell = _make_cell(sweep_dir, cid, store)
            snap = cell / fileio.CONFIG
            if not snap.exists():
                fileio.write_text_atomic(snap, OmegaConf.to_yaml(OmegaConf.create(plain)), fsync=False)
            if opts.get("rerun") == "all" or cellstate.read_status(cell).state != cellstate.CellState.DONE:
                _write_pickle(cell / JOB, {"task_function": task_function, "config": cfg,
                                           "hydra_context": launcher.hydra_context, "singletons": state,
                                           "resolvers": resolvers})
    finally:
        HydraConfig.instance().set_config(config)
    if not dry_run:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        manifest.write_plan(sweep_dir, manifest.plan_id([j[0] for j in jobs]), records.values(),
                            extra={"overrides": OmegaConf.to_container(config.hydra.overrides.task),
                                   "job_cells": [j[1] for j in jobs], "app": task_identity(task_function)})
        mr = sweep_dir / "multirun.yaml"
        if not mr.exists():
            OmegaConf.save(config, mr)
    for r in records.values():
        launcher._records.setdefault(r.id, r)
    try:
        code = backend.run(sweep_dir, list(records.values()), opts, summary=not launcher.defer_summary,
                           collect=launcher._statuses)
    except OSError as e:  # the sweep folder or the store takes no write: the backend stopped cleanly
        if not manifest.is_write_failure(e):
            raise
        raise Refused(manifest.write_failure_line(e)) from None
    if code == 130:  # interrupted: the cells were stopped; a re-issue resumes them
        sys.exit(130)
    if dry_run:  # nothing ran: no job has a return value for the sweeper to read
        sys.exit(0)
    queued: dict = {}  # submitted and not waited for: the cells a Slurm job owns (one squeue for all)
    if slurm and not opts.get("wait", False):
        raw = {cid: cellstate.read_status(cellstate.cell_dir(sweep_dir, cid)) for cid in records}
        seen = backend.refresh_status(sweep_dir, raw)
        queued = {cid: seen[cid].job_id for cid in backend.owned_by_slurm(seen)}
    returns = []
    for overrides, cid, cfg in jobs:
        cell = cellstate.cell_dir(sweep_dir, cid)
        if cid in queued:
            returns.append(queued_return(cell, overrides, cfg, task_name, queued[cid]))
        else:
            returns.append(job_return(cell, overrides, cfg, task_name))
    return returns, code


@dataclasses.dataclass
class QueuedJobReturn(JobReturn):
    """The ``JobReturn`` of a job whose cell a Slurm job owns (submitted by this launch, or found queued
    or running) when the launch does not wait (``hydra.launcher.wait=false``): status UNKNOWN, no value
    yet, ``job_id`` the Slurm job. Reading ``return_value`` gives None instead of Hydra's assertion, so a
    sweeper that reads every job's value only to raise a failed job's exception (Hydra's BasicSweeper)
    ends a successful submission with exit code 0; the values are in the store once the cells are DONE
    (a re-issue, or ``hydra.launcher.wait=true``, hands them back)."""

    job_id: Optional[str] = None

    @property  # type: ignore[override]
    def return_value(self) -> Any:
        if self.status == JobStatus.UNKNOWN:
            return None
        return JobReturn.return_value.fget(self)  # type: ignore[attr-defined]

    @return_value.setter
    def return_value(self, value: Any) -> None:
        self._return_value = value


def queued_return(cell: Path, overrides: list, cfg: Any, task_name: str, job_id: str) -> QueuedJobReturn:
    """The :class:`QueuedJobReturn` of a job whose cell waits for, or runs in, Slurm job ``job_id``."""
    from omegaconf import OmegaConf

    return QueuedJobReturn(overrides=list(overrides), cfg=OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]),
                           hydra_cfg=OmegaConf.masked_copy(cfg, ["hydra"]), task_name=task_name,
                           working_dir=str(cell), status=JobStatus.UNKNOWN, job_id=job_id)


def job_return(cell: Path, overrides: list, cfg: Any, task_name: str) -> Any:
    """The JobReturn of one job from its cell: the stored one when the cell is DONE (its return value,
    and the config and folder it ran with), else FAILED with the job's exception (or the cell's error)."""
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from launcher import cellstate

    status = cellstate.read_status(cell)
    stored = None
    if (cell / JOB_RETURN).exists():
        try:
            stored = _read_pickle(cell / JOB_RETURN)
        except Exception:  # noqa: BLE001 (a return that cannot be read: the job reads FAILED)
            stored = None
    task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    hydra_cfg = OmegaConf.masked_copy(cfg, ["hydra"])
    ret = JobReturn(overrides=list(overrides), cfg=task_cfg, hydra_cfg=hydra_cfg, task_name=task_name,
                    working_dir=str(cell))
    if stored is not None:
        ret.cfg, ret.hydra_cfg = stored.cfg, stored.hydra_cfg
        ret.working_dir, ret.task_name = stored.working_dir, stored.task_name or task_name
    if status.state == cellstate.CellState.DONE and stored is not None and stored.status == JobStatus.COMPLETED:
        ret.status = JobStatus.COMPLETED
        ret.return_value = stored._return_value
    else:
        ret.status = JobStatus.FAILED
        if stored is not None and isinstance(stored._return_value, BaseException) and status.state in (
                cellstate.CellState.FAILED, cellstate.CellState.DONE):
            ret.return_value = stored._return_value
        else:
            ret.return_value = JobNotDone(f"cell {cell.name} is {status.state.value}: "
                                           f"{cellstate.error_headline(status.error) or 'not run'}")
    return ret


# ---------------------------------------------------------------------------------------------------
# The cell process


def _error_json(cell: Path, e: BaseException) -> None:
    from launcher.fileio import ERROR, write_json_atomic

    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    write_json_atomic(cell / ERROR, {"type": type(e).__name__, "error": str(e).strip().splitlines()[-1:][0]
                                     if str(e).strip() else "", "traceback": tb})


def main(cell_dir: str) -> int:
    """Run the job pickled in ``cell_dir`` with Hydra's ``run_job``; 0 when it returned, 1 when it raised."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobStatus, run_job, setup_globals
    from omegaconf.basecontainer import BaseContainer

    from launcher.fileio import ERROR, RESULT, write_json_atomic

    cell = Path(cell_dir)
    for name in (RESULT, ERROR, JOB_RETURN):  # an earlier attempt's outcome never stands for this one
        try:
            os.unlink(cell / name)
        except FileNotFoundError:
            pass
    job = _read_pickle(cell / JOB)
    Singleton.set_state(job["singletons"])
    for name, fn in job["resolvers"].items():
        BaseContainer._resolvers.setdefault(name, fn)
    setup_globals()
    config = job["config"]
    HydraConfig.instance().set_config(config)
    ret = run_job(hydra_context=job["hydra_context"], task_function=job["task_function"], config=config,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    if ret.status == JobStatus.COMPLETED:
        try:
            _write_pickle(cell / JOB_RETURN, ret, fsync=True)
        except Exception as e:  # noqa: BLE001
            err = TypeError(f"the return value ({type(ret._return_value).__name__}) cannot be pickled: {e}")
            _error_json(cell, err)
            return 1
        value = ret._return_value
        metrics = {}
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
                and abs(value) != float("inf"):
            metrics["return_value"] = value
        write_json_atomic(cell / RESULT, {"status": "done", "metrics": metrics,
                                          "run": {"working_dir": str(ret.working_dir),
                                                  "output_dir": str(ret.hydra_cfg.hydra.runtime.output_dir),
                                                  "task_name": str(ret.task_name)}})
        return 0
    exc = ret._return_value
    try:
        _write_pickle(cell / JOB_RETURN, ret)
    except Exception:  # noqa: BLE001 (an exception that cannot be pickled: its text is in error.json)
        pass
    _error_json(cell, exc)
    traceback.print_exception(type(exc), exc, exc.__traceback__)
    return 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m launcher.taskcell CELL_DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
