"""``hydra/sweeper=optuna``: an Optuna study (Optuna >= 4) whose trials are cells.

The saved sweep ``+sweep=optuna_proxy`` selects this sweeper itself. Keys (``hydra.sweeper.*``):

- ``params``: the search space, in the syntax of Hydra's Optuna sweeper: ``interval(a, b)`` (floats),
  ``int(interval(a, b))``, ``tag(log, interval(a, b))``, ``choice(a, b, c)`` (also ``a,b,c``),
  ``range(start, stop, step)`` (the values Hydra's grid gives: ``stop`` excluded), ``shuffle(range(…))``
  (a choice among them), or a plain value (fixed for every trial). The command line adds to it (and
  wins over it key by key): ``proxy.threshold=interval(0.2,0.5)`` searches that key, ``proxy.mode=mean``
  fixes it.
- ``sampler``: a ``_target_`` config (default ``optuna.samplers.TPESampler``, options under
  ``hydra/sweeper/sampler=``: tpe, random, gp, qmc, nsgaii, bruteforce, grid, cmaes); keys left null
  take Optuna's default. ``grid`` takes its grid from ``params``.
- ``pruner``: a ``_target_`` config or null (default: no pruning); ``hydra/sweeper/pruner=median`` (or
  percentile, successive_halving, hyperband, threshold, nop), or
  ``'hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,lower:0.99}'``.
- ``direction`` (``maximize`` by default: ``val/acc_best`` is higher-better) or ``directions`` (a list;
  two for a multi-objective study, with ``hydra.launcher.objective`` a list of two metrics).
- ``n_trials``: the total of the study (COMPLETE, PRUNED and FAIL trials all count, as in Optuna's
  ``study.optimize``); re-issuing the command continues the study up to it.
- ``n_jobs``: trials asked per batch, run at once by the launcher's workers (null: ``hydra.launcher.workers``).
- ``study_name`` (null: the sweep folder's name), ``storage`` (null: ``optuna.journal`` in the sweep
  folder, Optuna's journal file, which needs no SQLite locking and so suits NFS; a URL such as
  ``sqlite:///study.db``: that database; any other string: a journal file at that path).
- ``max_failure_rate``: stop asking for trials once more than this share of this command's trials FAILED.
- ``custom_search_space``: ``module.function(cfg, trial)`` that suggests more parameters.

Each trial is a cell (:mod:`launcher.plugin`): its value is the cell's objective
(:mod:`launcher.objective`; the gain over its paired baseline with ``objective_vs_baseline``). A FAILED
cell is a FAIL trial; a cell stopped at a prune request is a PRUNED trial. The trial records its
overrides and its cell (``user_attrs``: ``overrides``, ``cell``, ``baseline``), so a trial left RUNNING by
an interrupted command is launched again as the same trial (its cell resumes from its checkpoint), and
DONE cells are never retrained: a trial whose parameters are a DONE cell's gets that cell's value at once.

While a batch runs, :class:`PruneMonitor` reads each running cell's per-epoch progress
(:mod:`launcher.progress`), reports it as the trial's intermediate values (with
``objective_vs_baseline``: minus the baseline's value at the same epoch) and, when the pruner says so,
asks the cell to stop at its next epoch boundary. Multi-objective studies are not pruned (Optuna does
not support it).

The sweep folder gets ``study.json`` (what ``python -m launcher.status`` shows: the study's name,
storage and counts; :func:`read_study`) and ``optimization_results.yaml`` (the best trial, as Hydra's
Optuna sweeper writes it). :func:`load_study` opens the study of a sweep folder.

With ``hydra/launcher=slurm`` (or ``slurm_v100``) the command does not wait for results: it creates or
opens the study, submits ``N`` worker jobs (``n_jobs``, else ``hydra.launcher.workers``) that each loop
ask → run a cell → tell on the shared journal, and exits (:mod:`launcher.optuna_worker`; a worker's
``--time`` is ``hydra.launcher.timeout_min``, covering the several cells it runs in turn). Re-issuing the
command submits only the workers missing (none while they are queued or running, none for a complete
study); ``python -m launcher.status DIR`` shows the study, refreshed by the workers after every trial.

Nothing here imports optuna until a sweep starts (Hydra imports this module at every start).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

JOURNAL = "optuna.journal"  # the default storage, in the sweep folder
STUDY_FILE = "study.json"  # what launcher.status reads (no optuna import there)
RESULTS_FILE = "optimization_results.yaml"
DIRECTIONS = ("maximize", "minimize")


# ------------------------------------------------------------------------------------------ the schema

@dataclass
class TPESamplerConf:
    """``hydra/sweeper/sampler=tpe`` (the default). Null keys take Optuna's default."""

    _target_: str = "optuna.samplers.TPESampler"
    seed: Optional[int] = None
    n_startup_trials: Optional[int] = None
    n_ei_candidates: Optional[int] = None
    multivariate: Optional[bool] = None
    group: Optional[bool] = None
    constant_liar: Optional[bool] = None
    consider_endpoints: Optional[bool] = None
    warn_independent_sampling: Optional[bool] = None


SAMPLERS: Dict[str, Dict[str, Any]] = {
    "random": {"_target_": "optuna.samplers.RandomSampler", "seed": None},
    "gp": {"_target_": "optuna.samplers.GPSampler", "seed": None, "n_startup_trials": None},
    "qmc": {"_target_": "optuna.samplers.QMCSampler", "seed": None, "qmc_type": None, "scramble": None},
    "nsgaii": {"_target_": "optuna.samplers.NSGAIISampler", "seed": None, "population_size": None},
    "bruteforce": {"_target_": "optuna.samplers.BruteForceSampler", "seed": None},
    "grid": {"_target_": "optuna.samplers.GridSampler", "seed": None},  # the grid: from params
    "cmaes": {"_target_": "optuna.samplers.CmaEsSampler", "seed": None, "n_startup_trials": None},  # pip install cmaes
}
_PRUNER_STEPS = {"n_warmup_steps": None, "interval_steps": None}
PRUNERS: Dict[str, Dict[str, Any]] = {
    "median": {"_target_": "optuna.pruners.MedianPruner", "n_startup_trials": None, **_PRUNER_STEPS,
               "n_min_trials": None},
    "percentile": {"_target_": "optuna.pruners.PercentilePruner", "percentile": 25.0, "n_startup_trials": None,
                   **_PRUNER_STEPS, "n_min_trials": None},
    "successive_halving": {"_target_": "optuna.pruners.SuccessiveHalvingPruner", "min_resource": None,
                           "reduction_factor": None, "min_early_stopping_rate": None},
    "hyperband": {"_target_": "optuna.pruners.HyperbandPruner", "min_resource": None, "max_resource": None,
                  "reduction_factor": None},
    "threshold": {"_target_": "optuna.pruners.ThresholdPruner", "lower": None, "upper": None, **_PRUNER_STEPS},
    "nop": {"_target_": "optuna.pruners.NopPruner"},
}


@dataclass
class OptunaSweeperConf:
    """``hydra/sweeper=optuna`` (see the module docstring)."""

    defaults: List[Any] = field(default_factory=lambda: ["_self_", {"sampler": "tpe"}, {"pruner": None}])
    _target_: str = "hydra_plugins.proxyattention_launcher.OptunaSweeper"
    _recursive_: bool = False  # the sampler and pruner are made when the study is, not by Hydra
    sampler: Any = None
    pruner: Any = None
    direction: Any = "maximize"
    directions: Optional[List[str]] = None
    n_trials: int = 20
    n_jobs: Optional[int] = None
    study_name: Optional[str] = None
    storage: Optional[str] = None
    max_failure_rate: float = 0.0
    params: Optional[Dict[str, Any]] = None
    custom_search_space: Optional[str] = None


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="launcher")
    cs.store(group="hydra/sweeper/sampler", name="tpe", node=TPESamplerConf, provider="launcher")
    for name, node in SAMPLERS.items():
        cs.store(group="hydra/sweeper/sampler", name=name, node=node, provider="launcher")
    for name, node in PRUNERS.items():
        cs.store(group="hydra/sweeper/pruner", name=name, node=node, provider="launcher")


# ------------------------------------------------------------------------------------------ the search space

class SearchSpaceError(ValueError):
    """A ``params`` entry (or command-line sweep) that is no Optuna distribution."""


def search_space(lines: Sequence[str], parser: Any = None) -> tuple[Dict[str, Any], Dict[str, str]]:
    """``({name: optuna distribution}, {key: fixed override})`` of override lines (``params`` first, then
    the command line: a later line for the same key wins)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = parser or OverridesParser.create()
    space: Dict[str, Any] = {}
    fixed: Dict[str, str] = {}
    for o in parser.parse_overrides(list(lines)):
        key = o.get_key_element()
        if o.is_sweep_override():
            space[key] = distribution(o)
            fixed.pop(key, None)
        else:
            fixed[key] = o.input_line
            space.pop(key, None)
    return space, fixed


def distribution(o: Any) -> Any:
    """The Optuna distribution of one sweep override (see the module docstring for the syntax)."""
    from hydra.core.override_parser.types import Transformer
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    value = o.value()
    if o.is_interval_sweep():
        start, end = value.start, value.end
        log_scale = "log" in value.tags
        if isinstance(start, int) and isinstance(end, int):  # int(interval(a, b))
            return IntDistribution(int(start), int(end), log=log_scale)
        return FloatDistribution(float(start), float(end), log=log_scale)
    if o.is_range_sweep() or o.is_choice_sweep():
        try:
            values = list(o.sweep_iterator(transformer=Transformer.encode))
        except Exception as e:  # glob() needs the config loader, and is no search space anyway
            raise SearchSpaceError(f"{o.input_line}: not a search space ({e})") from None
        if not values:
            raise SearchSpaceError(f"{o.input_line}: no values")
        if any(not isinstance(v, (str, int, float, bool, type(None))) for v in values):
            raise SearchSpaceError(f"{o.input_line}: a choice takes plain values (str, int, float, bool)")
        if o.is_range_sweep() and not value.shuffle:
            low, high = min(values), max(values)
            step = abs(value.step)
            if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                return IntDistribution(int(low), int(high), step=int(step))
            high = _decimal_steps(float(low), float(step), len(values) - 1)  # 0.3, not 0.30000000000000004
            return FloatDistribution(float(low), high, step=float(step))
        return CategoricalDistribution(values)
    raise SearchSpaceError(f"{o.input_line}: not a search space of this sweeper (interval, choice, range)")


def suggest(trial: Any, name: str, dist: Any) -> Any:
    """``trial.suggest_*`` for a distribution (the public API)."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    raise SearchSpaceError(f"{name}: unsupported distribution {dist!r}")


def grid_of(space: Dict[str, Any]) -> Dict[str, list]:
    """``GridSampler``'s search space: every value of each discrete distribution."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    grid = {}
    for name, d in space.items():
        if isinstance(d, CategoricalDistribution):
            grid[name] = list(d.choices)
        elif isinstance(d, IntDistribution) and not d.log:
            grid[name] = list(range(d.low, d.high + 1, d.step))
        elif isinstance(d, FloatDistribution) and d.step is not None:
            n = int(round((d.high - d.low) / d.step))
            grid[name] = [_decimal_steps(d.low, d.step, i) for i in range(n + 1)]
        else:
            raise SearchSpaceError(f"{name}: the grid sampler needs discrete values (choice or range), "
                                   f"not {type(d).__name__}")
    return grid


def _decimal_steps(low: float, step: float, n: int) -> float:
    """``low + n * step`` in decimal, as written: 0.1 + 2 * 0.1 is 0.3."""
    from decimal import Decimal

    return float(Decimal(repr(low)) + n * Decimal(repr(step)))


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")


def override_value(v: Any) -> str:
    """A suggested value as an override's value (a string that parses back to the same value)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v)
    if _PLAIN.fullmatch(s) and s.lower() not in ("true", "false", "null", "nan", "inf"):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ------------------------------------------------------------------------------------------ storage

def storage_location(storage: Optional[str], sweep_dir: Path) -> tuple[str, str]:
    """``(kind, where)``: ``("journal", absolute file)`` or ``("rdb", URL)`` (a relative SQLite path made
    absolute, so the study opens from any folder)."""
    if storage is None or not str(storage).strip():
        return "journal", str((Path(sweep_dir) / JOURNAL).absolute())
    s = str(storage).strip()
    if "://" in s:
        prefix = "sqlite:///"
        if s.startswith(prefix) and not s.startswith(prefix + "/"):
            s = prefix + str(Path(s[len(prefix):]).absolute())
        return "rdb", s
    return "journal", str(Path(s).expanduser().absolute())


def open_storage(kind: str, where: str) -> Any:
    """What ``optuna.load_study(storage=…)`` takes for a storage of :func:`storage_location`."""
    if kind == "journal":
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(where))
    return where


def read_study(sweep_dir: Path | str) -> Optional[dict]:
    """The sweep folder's ``study.json`` (``{"name", "storage", "storage_kind", "directions", "objective",
    "n_trials", "complete", "pruned", "failed", "running", "best_value", "best_params", …}``), or None.
    Reads one small file; never imports optuna."""
    try:
        d = json.loads((Path(sweep_dir) / STUDY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and isinstance(d.get("name"), str) else None


def load_study(sweep_dir: Path | str) -> Any:
    """The ``optuna.Study`` of a sweep folder run by this sweeper (from its ``study.json``)."""
    import optuna

    d = read_study(sweep_dir)
    if d is None:
        raise FileNotFoundError(f"{Path(sweep_dir) / STUDY_FILE}: no study here (not an Optuna sweep folder)")
    return optuna.load_study(study_name=d["name"], storage=open_storage(d["storage_kind"], d["storage"]))


def study_record(study: Any, kind: str, where: str, n_trials: int, objective: Sequence[str],
                 gain: bool) -> dict:
    """What ``study.json`` holds: the study's name, storage, counts and best trial(s)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)

    def count(state: Any) -> int:
        return sum(t.state == state for t in trials)

    d: Dict[str, Any] = {
        "name": study.study_name, "storage": where, "storage_kind": kind,
        "directions": [x.name.lower() for x in study.directions], "objective": list(objective),
        "objective_vs_baseline": gain, "n_trials": n_trials, "trials": len(trials),
        "complete": count(TrialState.COMPLETE), "pruned": count(TrialState.PRUNED),
        "failed": count(TrialState.FAIL), "running": count(TrialState.RUNNING),
        "best_value": None, "best_params": None, "best_trial": None, "best_cell": None,
    }
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(study.directions) == 1 and complete:
        best = study.best_trial
        d.update(best_value=best.value, best_params=dict(best.params), best_trial=best.number,
                 best_cell=best.user_attrs.get("cell"))
    elif complete:
        d["pareto_front"] = [{"trial": t.number, "values": list(t.values), "params": dict(t.params),
                              "cell": t.user_attrs.get("cell")} for t in study.best_trials]
    return d


# ------------------------------------------------------------------------------------------ progress, pruning

class ProgressSource(Protocol):
    """Where the monitor reads a running cell's per-epoch metrics, how it asks a cell to stop, and how it
    tells a watched cell which epochs it has judged (:func:`launcher.progress.await_judgement`)."""

    def metric_by_epoch(self, cell: Path, name: str) -> Dict[int, float]: ...

    def request_prune(self, cell: Path, reason: str) -> None: ...

    def mark_judged(self, cell: Path, epoch: int, poll_s: float) -> None: ...

    def clear_judged(self, cell: Path) -> None: ...


class CellProgress:
    """Each cell's ``progress.json`` (:mod:`launcher.progress`); a finished cell without one (run
    before progress files existed) from its ``result.json`` history."""

    def metric_by_epoch(self, cell: Path, name: str) -> Dict[int, float]:
        from launcher import cellstate, progress

        record = progress.read_progress(cell)
        if record is None:
            result = cellstate.read_result(cell)
            if result is None:
                return {}
            record = {"history": progress.progress_rows(list(result.get("history") or []))}
        return progress.metric_by_epoch(record, name)

    def request_prune(self, cell: Path, reason: str) -> None:
        from launcher import progress

        progress.request_prune(cell, reason)

    def mark_judged(self, cell: Path, epoch: int, poll_s: float) -> None:
        from launcher import progress

        progress.mark_judged(cell, epoch, poll_s)

    def clear_judged(self, cell: Path) -> None:
        from launcher import progress

        progress.clear_judged(cell)


@dataclass
class Watched:
    """A running trial and its cell (and, for a gain, its baseline's cell)."""

    trial: Any  # optuna.trial.Trial
    cell: Path
    baseline: Optional[Path] = None
    reported: set = field(default_factory=set)  # epochs already reported
    pruned_at: Optional[int] = None  # the epoch after which it was asked to stop
    judged: Optional[int] = None  # the epoch its judged.json says, and when it was written (monotonic s)
    judged_at: float = 0.0


# With a pruner the monitor reads the cells' progress at least this often (s): a watched cell waits for
# its verdict at every epoch boundary, on average half of this. Its judged.json is rewritten when the
# epoch judged changes and at least every JUDGE_REFRESH_S (a cell stops waiting on a mark 3 of these old).
JUDGE_POLL_S = 0.25
JUDGE_REFRESH_S = 1.0


class PruneMonitor:
    """While a batch runs: report each trial's per-epoch objective and ask the pruner.

    ``poll()`` is one pass over the watched trials; ``start()``/``stop()`` run it every ``poll_s`` in a
    thread (``stop()`` ends with one last pass, so a trial's last epochs are reported before it is told).
    With a pruner it polls at least every :data:`JUDGE_POLL_S` and marks each watched cell's epochs as
    judged (``judged.json``, :func:`launcher.progress.await_judgement`): the cell waits at its epoch
    boundary for the verdict, so a pruned cell stops after the epoch that was pruned, not one later."""

    def __init__(self, source: ProgressSource, metric: str, prune: bool, poll_s: float = 10.0,
                 say: Callable[[str], None] = print) -> None:
        self.source = source
        self.metric = metric
        self.prune = prune
        self.poll_s = min(poll_s, JUDGE_POLL_S) if prune else poll_s
        self.say = say
        self.watched: List[Watched] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._warned = False

    def watch(self, entries: Sequence[Watched]) -> None:
        with self._lock:
            self.watched.extend(entries)

    def pruned(self, trial_number: int) -> Optional[int]:
        """The epoch after which this trial was asked to stop (None: it was not)."""
        return next((w.pruned_at for w in self.watched if w.trial.number == trial_number), None)

    def values(self, w: Watched, read: Optional[Callable[[Path], Dict[int, float]]] = None
               ) -> tuple[int, Dict[int, float]]:
        """The cell's last epoch with a value, and the values to report (the gains, with a baseline)."""
        read = read or (lambda cell: self.source.metric_by_epoch(cell, self.metric))
        mine = read(w.cell)
        last = max(mine, default=0)
        if w.baseline is None:
            return last, mine
        base = read(w.baseline)
        return last, {e: v - base[e] for e, v in mine.items() if e in base}

    def poll(self) -> None:
        with self._lock:
            watched = list(self.watched)
        seen: Dict[Path, Dict[int, float]] = {}  # one read per cell per pass: trials share their baseline

        def read(cell: Path) -> Dict[int, float]:
            if cell not in seen:
                seen[cell] = self.source.metric_by_epoch(cell, self.metric)
            return seen[cell]

        for w in watched:
            last, values = self.values(w, read)
            new = sorted(e for e in values if e not in w.reported)
            for e in new:
                w.trial.report(values[e], step=e)
                w.reported.add(e)
            if new and self.prune and w.pruned_at is None and w.trial.should_prune():
                e = new[-1]
                reason = (f"Optuna pruner: trial {w.trial.number}, {self.metric} {values[e]:.4f} after epoch {e}")
                self.source.request_prune(w.cell, reason)
                w.pruned_at = e
                self.say(f"trial {w.trial.number}: pruning its cell {w.cell.name} after epoch {e} "
                         f"({self.metric} {values[e]:.4f})")
            if self.prune and w.pruned_at is None:
                # Judged up to the cell's own last epoch, even one whose gain waits for its baseline:
                # the cell never waits on another cell, only on this poll.
                now = time.monotonic()
                if last != w.judged or now - w.judged_at >= JUDGE_REFRESH_S:
                    self.source.mark_judged(w.cell, last, JUDGE_REFRESH_S)
                    w.judged, w.judged_at = last, now

    def _safe_poll(self) -> None:
        try:
            self.poll()
        except Exception as e:  # noqa: BLE001 (a monitor must never stop the batch)
            if not self._warned:
                log.warning("reading the trials' progress failed: %s", e)
                self._warned = True

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._safe_poll()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="optuna-prune-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._safe_poll()
        if self.prune:
            for w in self.watched:
                self.source.clear_judged(w.cell)


# ------------------------------------------------------------------------------------------ the sweeper

def _drop_nulls(cfg: Any) -> Dict[str, Any]:
    d = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    return {k: v for k, v in d.items() if v is not None}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class OptunaSweeper(Sweeper):
    """An Optuna study whose trials are cells (see the module docstring)."""

    def __init__(self, sampler: Any = None, pruner: Any = None, direction: Any = "maximize",
                 directions: Optional[Sequence[str]] = None, n_trials: int = 20, n_jobs: Optional[int] = None,
                 study_name: Optional[str] = None, storage: Optional[str] = None, max_failure_rate: float = 0.0,
                 params: Optional[Dict[str, Any]] = None, custom_search_space: Optional[str] = None,
                 **unknown: Any) -> None:
        if unknown:  # keys of Hydra's Optuna sweeper that this one has no use for (search_space: use params)
            raise ValueError(f"hydra.sweeper: unknown keys {sorted(unknown)} (hydra/sweeper=optuna takes "
                             "params, sampler, pruner, direction(s), n_trials, n_jobs, study_name, storage, "
                             "max_failure_rate, custom_search_space)")
        self.sampler_cfg = sampler
        self.pruner_cfg = pruner
        self.direction = direction
        self.directions_cfg = directions
        self.n_trials = int(n_trials)
        self.n_jobs = n_jobs
        self.study_name = study_name
        self.storage = storage
        self.max_failure_rate = float(max_failure_rate)
        self.params = dict(params or {})
        self.custom_search_space = custom_search_space
        self.config: Optional[DictConfig] = None
        self.hydra_context: Optional[HydraContext] = None
        self.launcher: Any = None
        self.job_idx = 0

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    # --- configuration -------------------------------------------------------------------------------

    def directions(self) -> List[str]:
        raw = self.directions_cfg if self.directions_cfg is not None else self.direction
        listed = [raw] if isinstance(raw, str) else list(raw or [])
        out = [str(getattr(d, "name", d)).lower() for d in listed]
        if not out or any(d not in DIRECTIONS for d in out):
            raise ValueError(f"hydra.sweeper.direction(s)={raw!r}: maximize or minimize, or a list of them")
        return out

    def make_sampler(self, space: Dict[str, Any], trials_so_far: int = 0) -> Any:
        """The sampler of ``hydra.sweeper.sampler``. A seed is offset by the trials the study already has,
        so a continued study does not replay its first suggestions (a sampler's random state is not
        stored with the study), and the same command on the same study still suggests the same."""
        from hydra.utils import instantiate

        if self.sampler_cfg is None:
            return None
        kw = _drop_nulls(self.sampler_cfg)
        if kw.get("_target_", "").endswith("GridSampler") and "search_space" not in kw:
            kw["search_space"] = grid_of(space)
        if kw.get("seed") is not None:
            kw["seed"] = int(kw["seed"]) + trials_so_far
        return instantiate(kw, _convert_="all")

    def make_pruner(self, multi: bool) -> Any:
        from hydra.utils import instantiate

        if self.pruner_cfg is None:
            return None
        if multi:
            raise ValueError("hydra.sweeper.pruner: Optuna does not prune multi-objective studies (set it to null)")
        return instantiate(_drop_nulls(self.pruner_cfg), _convert_="all")

    def trial_overrides(self, trial: Any, space: Dict[str, Any], fixed: Dict[str, str]) -> List[str]:
        for name, dist in space.items():
            suggest(trial, name, dist)
        if self.custom_search_space:
            from hydra.utils import get_method

            get_method(self.custom_search_space)(self.config, trial)
        clash = set(trial.params) & set(fixed)
        if clash:
            raise ValueError(f"hydra.sweeper: {sorted(clash)} both fixed and searched")
        return list(fixed.values()) + [f"{k}={override_value(v)}" for k, v in trial.params.items()]

    # --- the sweep -----------------------------------------------------------------------------------

    def sweep(self, arguments: List[str]) -> Any:
        from launcher import apps, objective, plugin

        assert self.config is not None and self.hydra_context is not None
        if not isinstance(self.launcher, plugin.SweepLauncher):
            raise plugin.SweepError("hydra/sweeper=optuna runs each trial as a cell: use the launcher's own "
                                    "launchers (hydra/launcher=local or slurm)")
        try:
            import optuna
        except ImportError:
            raise plugin.SweepError("hydra/sweeper=optuna needs Optuna >= 4: pip install -e '.[optuna]'") from None
        if int(optuna.__version__.split(".")[0]) < 4:
            raise plugin.SweepError(f"hydra/sweeper=optuna needs Optuna >= 4 (found {optuna.__version__}): "
                                    "pip install -e '.[optuna]'")
        launcher = self.launcher
        launcher.defer_summary = True  # one summary of every cell of the study's command, at the end
        launcher.adaptive = True
        launcher.check_options()  # a backend that cannot return results refuses before anything is written
        lcfg = self.config.hydra.launcher
        app = apps.for_config(self.config)
        gain = bool(lcfg.get("objective_vs_baseline", False)) and app is not None
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        try:
            directions = self.directions()
            if app is None:  # any app's job: the objective is what it returns
                names = ["return"] if len(directions) == 1 else [f"return[{i}]" for i in range(len(directions))]
            else:
                names = objective.names(lcfg.get("objective"), app.default_objective)
            if len(names) != len(directions):
                raise ValueError(f"hydra.launcher.objective={names} has {len(names)} metric(s) for "
                                 f"{len(directions)} direction(s) {directions}: give one metric per direction")
            space, fixed = search_space([f"{k}={v}" for k, v in self.params.items()] + list(arguments), parser)
            if self.n_trials < 1:
                raise ValueError(f"hydra.sweeper.n_trials={self.n_trials} must be >= 1")
            if not 0.0 <= self.max_failure_rate <= 1.0:
                raise ValueError(f"hydra.sweeper.max_failure_rate={self.max_failure_rate} must be in [0, 1]")
            self.make_sampler(space)  # refused now if it cannot be made (made again with the study's seed offset)
            pruner = self.make_pruner(len(directions) > 1)
        except Exception as e:  # one line, no traceback: these are configuration mistakes
            raise plugin.SweepError(str(e)) from None
        n_jobs = int(self.n_jobs or lcfg.get("workers", 1) or 1)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        run = _StudyRun(self, sweep_dir, space, fixed, names, gain, directions, pruner, n_jobs,
                        poll_s=float(lcfg.get("heartbeat_s", 10.0) or 10.0))
        from launcher import optuna_worker

        if getattr(launcher, "backend", None) == "slurm":  # submit worker jobs and exit
            return run.submit()
        worker = os.environ.get(optuna_worker.WORKER_ENV)
        if worker and not bool(lcfg.get("dry_run", False)):  # inside a worker job: loop ask, run, tell
            return run.work(worker)
        if bool(lcfg.get("dry_run", False)):
            return run.dry_run()
        return run.run()


class _StudyRun:
    """One command's work on the study: resume interrupted trials, ask and run batches, tell results."""

    def __init__(self, sweeper: OptunaSweeper, sweep_dir: Path, space: Dict[str, Any], fixed: Dict[str, str],
                 names: List[str], gain: bool, directions: List[str], pruner: Any, n_jobs: int,
                 poll_s: float) -> None:
        self.s = sweeper
        self.launcher = sweeper.launcher
        self.sweep_dir = sweep_dir
        self.space, self.fixed = space, fixed
        self.names, self.gain, self.directions = names, gain, directions
        self.pruner = pruner
        self.n_jobs = max(1, n_jobs)
        self.poll_s = poll_s
        self.kind, self.where = storage_location(sweeper.storage, sweep_dir)
        self.name = sweeper.study_name or sweep_dir.name
        self.told: Dict[int, str] = {}  # trial number -> state name, this command's trials
        self._monitor: Optional[PruneMonitor] = None  # the last batch's
        self.interrupted: List[int] = []  # trials left RUNNING by an interruption (resumed by a re-issue)
        self.failures: List[str] = []
        self.progress_source: ProgressSource = CellProgress()  # where the pruning monitor reads each epoch

    # --- the study -----------------------------------------------------------------------------------

    def _exists(self) -> bool:
        """Whether the storage may hold the study (never creating it: a dry run writes nothing)."""
        if self.kind == "journal":
            return Path(self.where).is_file() and Path(self.where).stat().st_size > 0
        if self.where.startswith("sqlite:///"):
            return Path(self.where[len("sqlite:///"):]).is_file()
        return True

    def open(self) -> Any:
        import optuna

        from launcher import plugin

        if self.kind == "journal":
            Path(self.where).parent.mkdir(parents=True, exist_ok=True)
        storage = open_storage(self.kind, self.where)
        study = optuna.create_study(storage=storage, sampler=optuna.samplers.RandomSampler(),
                                    study_name=self.name, directions=self.directions, load_if_exists=True)
        sampler = self.s.make_sampler(self.space, len(study.get_trials(deepcopy=False)))
        study = optuna.load_study(study_name=self.name, storage=storage, sampler=sampler,
                                  pruner=self.pruner or optuna.pruners.NopPruner())
        have = [d.name.lower() for d in study.directions]
        if have != self.directions:
            raise plugin.SweepError(f"the study {self.name!r} in {self.where} has directions {have}, not "
                                    f"{self.directions}: choose another hydra.sweeper.study_name or hydra.sweep.dir")
        return study

    def record(self, study: Any) -> dict:
        d = study_record(study, self.kind, self.where, self.s.n_trials, self.names, self.gain)
        d.update(epoch_savings(study, self.sweep_dir))
        from launcher import fileio

        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        fileio.write_text_atomic(self.sweep_dir / STUDY_FILE, json.dumps(d, indent=1) + "\n")
        return d

    # --- dry run -------------------------------------------------------------------------------------

    def dry_run(self) -> Any:
        """The next batch, from a copy of the study in memory (nothing is written)."""
        import optuna

        trials: List[Any] = []
        if self._exists():
            try:
                trials = optuna.load_study(study_name=self.name, storage=open_storage(self.kind, self.where)
                                           ).get_trials(deepcopy=False)
            except KeyError:
                trials = []
        memory = optuna.create_study(sampler=self.s.make_sampler(self.space, len(trials)),
                                     directions=self.directions)
        memory.add_trials([t for t in trials if t.state.is_finished()])
        resume = [list(t.user_attrs["overrides"]) for t in trials
                  if t.state == optuna.trial.TrialState.RUNNING and t.user_attrs.get("overrides")]
        counted = sum(t.state != optuna.trial.TrialState.WAITING for t in trials)
        batch = resume[:self.n_jobs]
        for _ in range(min(self.n_jobs - len(batch), self.s.n_trials - counted)):
            batch.append(self.s.trial_overrides(memory.ask(), self.space, self.fixed))
        if not batch:
            print(f"dry run: the study {self.name!r} has its {self.s.n_trials} trials; nothing would run "
                  "(raise hydra.sweeper.n_trials to continue it)")
            return []
        return self.launcher.launch(batch, initial_job_idx=0)

    # --- the run -------------------------------------------------------------------------------------

    def run(self) -> Any:
        from launcher import plugin

        new = not (Path(self.where).exists() if self.kind == "journal" else False)
        made = [p for p in (self.sweep_dir, *self.sweep_dir.parents) if not p.exists()][::-1]
        study = self.open()
        self.record(study)
        returns: List[Any] = []
        try:
            self._loop(study, returns)
        except plugin.SweepError:
            if new and not self.told:  # a refused first batch leaves no study behind
                _remove_study(Path(self.where), self.sweep_dir / STUDY_FILE, made)
            raise
        self._finish(study, "interrupted: trial(s) {} stay RUNNING in the study; run the same command again to "
                            "resume them (as the same trials, their cells from their checkpoints)",
                     f"error: not every trial of this command is COMPLETE or PRUNED ({len(self.failures)} FAIL; "
                     "the summary above lists the cells); a FAIL trial counts toward hydra.sweeper.n_trials")
        return returns

    def _finish(self, study: Any, interrupted: str, failed: Optional[str] = None) -> None:
        """The study's record and results, the summary and closing line; exit 130 when trials were
        interrupted (``interrupted`` formatted with their numbers), else non-zero after a FAIL trial."""
        from launcher import plugin

        record = self.record(study)
        self._results_yaml(study)
        self.launcher.print_summary()
        print(closing_line(record))
        if self.interrupted:
            print(interrupted.format(", ".join(map(str, self.interrupted))), file=sys.stderr)
            sys.exit(130)
        code = max(plugin.EXIT_CODE, 1 if self.failures else 0)
        if code:
            for line in self.failures:
                print(line, file=sys.stderr)
            if failed:
                print(failed, file=sys.stderr)
            sys.exit(code)

    # --- Slurm: worker jobs on the shared study (launcher.optuna_worker) --------------------------------

    def submit(self) -> Any:
        """Create or open the study, submit the worker jobs it still needs, print them, return."""
        import optuna

        from launcher import apps, optuna_worker, plugin
        from launcher.slurm import SlurmOptions, SubmissionError

        assert self.s.config is not None
        opts = SlurmOptions.from_config(self.s.config.hydra.launcher)
        argv = optuna_worker.worker_argv(self.s.config, self.sweep_dir, opts)
        limit = (f"time limit {opts.timeout_min} min per worker (hydra.launcher.timeout_min: a worker runs "
                 "several cells in turn)")
        if opts.dry_run:  # writes nothing: the study is read if it exists
            trials: List[Any] = []
            if self._exists():
                try:
                    trials = optuna.load_study(study_name=self.name, storage=open_storage(self.kind, self.where)
                                               ).get_trials(deepcopy=False)
                except KeyError:
                    trials = []
            finished = sum(t.state.is_finished() for t in trials)
            left = max(0, self.s.n_trials - finished)
            n = min(self.n_jobs, left) if left else 0
            print(f"dry run: the study {self.name!r} ({self.where}) has {finished} of its {self.s.n_trials} trials "
                  f"finished; up to {n} worker job(s) would be submitted (hydra.sweeper.n_jobs or "
                  f"hydra.launcher.workers, at most {opts.array_parallelism} at once), each looping ask, run a "
                  f"cell, tell until the study has {self.s.n_trials} trials; {limit}; fewer if workers of this "
                  "study are still queued or running")
            print("each worker runs: python -m launcher " + " ".join(argv))
            print(f"dry run: nothing submitted, nothing written; sweep folder: {self.sweep_dir}")
            return []
        new = not self._exists()
        made = [p for p in (self.sweep_dir, *self.sweep_dir.parents) if not p.exists()][::-1]
        study = self.open()
        self.record(study)
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state.is_finished() for t in trials)
        try:
            app = apps.for_config(self.s.config)
            ids = optuna_worker.submit_workers(self.sweep_dir, opts, self.n_jobs, argv, finished=finished,
                                               n_trials=self.s.n_trials, hub_offline=app is not None and app.hub_offline)
        except SubmissionError as e:
            if new:
                _remove_study(Path(self.where), self.sweep_dir / STUDY_FILE, made)
            raise plugin.SweepError(str(e)) from None
        if ids:
            print(f"study {self.name!r}: {finished} of {self.s.n_trials} trials finished; submitted {len(ids)} "
                  f"worker job(s) to Slurm: {', '.join(ids)} (at most {min(len(ids), opts.array_parallelism)} "
                  f"at once; {limit})")
        print(f"study storage: {self.where}" + (" (Optuna journal file)" if self.kind == "journal" else ""))
        print(f"sweep folder: {self.sweep_dir}\nwatch: python -m launcher.status {self.sweep_dir}   "
              f"(worker logs: {self.sweep_dir / 'slurm'})")
        return []

    def work(self, worker_id: str) -> Any:
        """Inside a worker job: loop ask (or take over an abandoned RUNNING trial), run, tell."""
        from launcher import optuna_worker, plugin

        study = self.open()

        def new_overrides(trial: Any) -> List[str]:
            try:
                return self.s.trial_overrides(trial, self.space, self.fixed)
            except Exception as e:  # a custom search space that raises
                raise plugin.SweepError(f"hydra.sweeper.custom_search_space: {e}") from None

        def stop() -> bool:  # the command's failure rate: every worker of its job array, not this one's alone
            failed, finished = optuna_worker.command_failures(study, worker_id)
            if failed and failed / max(1, finished) > self.s.max_failure_rate:
                print(f"worker {worker_id}: {failed} of the {finished} trials the workers of job "
                      f"{optuna_worker.array_of(worker_id)} finished FAILED, more than hydra.sweeper."
                      f"max_failure_rate={self.s.max_failure_rate}: it asks no more trials", file=sys.stderr)
                return True
            return plugin.EXIT_CODE == 130

        loop = optuna_worker.WorkerLoop(
            study=study, n_trials=self.s.n_trials, worker_id=worker_id,
            lock=optuna_worker.lock_path(self.kind, self.where, self.sweep_dir), new_overrides=new_overrides,
            run=lambda trial, overrides: self.run_one(study, trial, overrides), alive=optuna_worker.slurm_alive,
            stop=stop, elsewhere=lambda t: _running_elsewhere(self.sweep_dir, t.user_attrs.get("cell")),
            reseed=lambda n: self.s.make_sampler(self.space, n))
        loop.loop()
        self._finish(study, f"worker {worker_id} interrupted: trial(s) {{}} stay RUNNING in the study; another "
                            "worker, or the workers of the same command issued again, resume them")
        return []

    def run_one(self, study: Any, trial: Any, overrides: List[str]) -> Optional[str]:
        """Run one trial's cell(s) and tell the study; the state told, or None when interrupted (the
        trial stays RUNNING)."""
        from optuna.trial import TrialState

        from launcher import plugin

        self.record(study)  # launcher.status: the trial shows RUNNING while its cell runs
        try:
            rets = self._launch(study, [(trial, overrides)])
        except plugin.SweepError as e:  # refused before it ran: the trial can never run as it is
            trial.set_user_attr("refused", str(e))
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        attrs = study.get_trials(deepcopy=False)[trial.number].user_attrs
        if plugin.EXIT_CODE == 130 and (_unfinished(self.sweep_dir, attrs.get("cell"))
                                        or _unfinished(self.sweep_dir, attrs.get("baseline"))):
            self.interrupted.append(trial.number)
            return None
        self._tell(study, trial, rets[0])
        self.record(study)
        return self.told.get(trial.number)

    def _loop(self, study: Any, returns: List[Any]) -> None:
        from optuna.trial import Trial, TrialState

        from launcher import optuna_worker, plugin

        resume = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            worker = t.user_attrs.get(optuna_worker.WORKER_ATTR)
            if worker is not None and optuna_worker.slurm_alive(str(worker)):
                continue  # a Slurm worker job of this study runs it (launcher.optuna_worker)
            overrides = t.user_attrs.get("overrides")
            if not overrides:  # asked, never given its parameters: nothing to resume
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
                continue
            if _running_elsewhere(self.sweep_dir, t.user_attrs.get("cell")):
                continue  # another launcher runs its cell: that launcher tells it
            resume.append(t)
        if resume:
            print(f"study {self.name!r}: resuming {len(resume)} interrupted trial(s) "
                  f"({', '.join(str(t.number) for t in resume)})")
        while True:
            batch: List[tuple[Any, List[str]]] = []
            while resume and len(batch) < self.n_jobs:
                t = resume.pop(0)  # the same trial again: Optuna's Trial of a RUNNING trial's id
                batch.append((Trial(study, t._trial_id), list(t.user_attrs["overrides"])))
            if not batch:
                counted = sum(t.state != TrialState.WAITING for t in study.get_trials(deepcopy=False))
                for _ in range(min(self.n_jobs, self.s.n_trials - counted)):
                    trial = study.ask()
                    try:
                        overrides = self.s.trial_overrides(trial, self.space, self.fixed)
                    except Exception as e:  # a custom search space that raises
                        study.tell(trial, state=TrialState.FAIL)
                        raise plugin.SweepError(f"hydra.sweeper.custom_search_space: {e}") from None
                    trial.set_user_attr("overrides", overrides)
                    batch.append((trial, overrides))
            if not batch:
                break
            try:
                rets = self._launch(study, batch)
            except plugin.SweepError as e:  # refused before it ran: its trials can never run as they are
                for trial, _ in batch:
                    trial.set_user_attr("refused", str(e))
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                raise
            returns.append(rets)
            for (trial, _), ret in zip(batch, rets):
                attrs = study.get_trials(deepcopy=False)[trial.number].user_attrs
                if plugin.EXIT_CODE == 130 and (_unfinished(self.sweep_dir, attrs.get("cell"))
                                                or _unfinished(self.sweep_dir, attrs.get("baseline"))):
                    self.interrupted.append(trial.number)  # left RUNNING: the next command resumes it
                    continue
                self._tell(study, trial, ret)
            self.record(study)
            if plugin.EXIT_CODE == 130:
                break
            failed = sum(st == "FAIL" for st in self.told.values())
            if failed and failed / max(1, len(self.told)) > self.s.max_failure_rate:
                print(f"study {self.name!r}: {failed} of {len(self.told)} trials of this command FAILED, more "
                      f"than hydra.sweeper.max_failure_rate={self.s.max_failure_rate}: no more trials asked",
                      file=sys.stderr)
                break

    def _launch(self, study: Any, batch: List[tuple[Any, List[str]]]) -> Any:
        from launcher import cellstate

        single = len(self.directions) == 1
        monitor = PruneMonitor(self.progress_source, self.names[0], prune=self.pruner is not None, poll_s=self.poll_s)

        def on_plan(plan: Any) -> None:
            records = {c.id: c.record for c in plan.cells}
            baselines = {r.baseline for r in records.values() if r.baseline}
            entries = []
            for (trial, _), cid in zip(batch, plan.job_cells):
                record = records.get(cid)
                base = record.baseline if record is not None else None
                trial.set_user_attr("cell", cid)
                if base:
                    trial.set_user_attr("baseline", base)
                if not single or cid in baselines or record is None or record.role == "baseline" or (
                        self.gain and not base):
                    continue  # never pruned: a cell trials are paired with, or no objective per epoch
                prior = study.get_trials(deepcopy=False)[trial.number].intermediate_values
                entries.append(Watched(trial, cellstate.cell_dir(self.sweep_dir, cid),
                                       cellstate.cell_dir(self.sweep_dir, base) if self.gain and base else None,
                                       reported=set(prior)))
            monitor.watch(entries)

        self.launcher.on_plan = on_plan
        monitor.start()
        try:
            rets = self.launcher.launch([ov for _, ov in batch], initial_job_idx=self.s.job_idx)
        finally:
            monitor.stop()
            self.launcher.on_plan = None
        self.s.job_idx += len(batch)
        self._monitor = monitor
        return rets

    def _tell(self, study: Any, trial: Any, ret: Any) -> None:
        from hydra.core.utils import JobStatus
        from optuna.trial import TrialState

        from launcher import cellstate

        cell = Path(ret.working_dir)
        status = cellstate.read_status(cell)
        label = " ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
        if ret.status == JobStatus.COMPLETED and ret.return_value is not None:
            values = ret.return_value if isinstance(ret.return_value, list) else [ret.return_value]
            values = [float(v) for v in values]
            if all(math.isfinite(v) for v in values):
                study.tell(trial, values if len(values) > 1 else values[0], skip_if_finished=True)
                self.told[trial.number] = "COMPLETE"
                shown = "  ".join(f"{n} {v:.4f}" for n, v in zip(self.names, values))
                print(f"trial {trial.number} COMPLETE  {shown}  {label}")
                return
        pruned_at = self._monitor.pruned(trial.number) if self._monitor is not None else None
        stopped = pruned_at is not None and status.state != cellstate.CellState.DONE
        if status.state == cellstate.CellState.PRUNED or stopped:
            study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
            self.told[trial.number] = "PRUNED"
            print(f"trial {trial.number} PRUNED  {cellstate.error_headline(status.error) or ''}  {label}".rstrip())
            return
        if ret.status == JobStatus.COMPLETED:
            why = f"cell {cell.name}: no finite {self.names} in its result.json"
        else:
            why = str(getattr(ret, "_return_value", "")) or f"cell {cell.name} is {status.state.value}"
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        self.told[trial.number] = "FAIL"
        self.failures.append(f"trial {trial.number} FAIL: {why}")
        print(f"trial {trial.number} FAIL  {label}")

    def _results_yaml(self, study: Any) -> None:
        """``optimization_results.yaml``, as Hydra's Optuna sweeper writes it."""
        from optuna.trial import TrialState

        from launcher import fileio

        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            return
        if len(self.directions) == 1:
            best = study.best_trial
            out: Dict[str, Any] = {"name": "optuna", "best_params": dict(best.params), "best_value": best.value}
        else:
            out = {"name": "optuna", "solutions": [{"params": dict(t.params), "values": list(t.values)}
                                                   for t in study.best_trials]}
        fileio.write_text_atomic(self.sweep_dir / RESULTS_FILE, OmegaConf.to_yaml(OmegaConf.create(out)))


def _running_elsewhere(sweep_dir: Path, cid: Optional[str]) -> bool:
    """Whether the trial's cell is claimed by a live launcher (another command runs it now)."""
    if not cid:
        return False
    from launcher import cellstate, manifest

    cell = cellstate.cell_dir(sweep_dir, cid)
    return cell.exists() and manifest.claim_holder(cell) is not None


def _unfinished(sweep_dir: Path, cid: Optional[str]) -> bool:
    """Whether a cell was left unfinished by an interruption (never started, or stopped by Ctrl-C/SIGTERM)."""
    if not cid:
        return False
    from launcher import cellstate

    status = cellstate.read_status(cellstate.cell_dir(sweep_dir, cid))
    return not status.state.finished or (status.state == cellstate.CellState.CANCELLED and status.interrupted)


def _remove_study(journal: Path, record: Path, made: Sequence[Path]) -> None:
    for p in (journal, record, *journal.parent.glob(journal.name + ".lock*")):
        try:
            p.unlink()
        except OSError:
            pass
    for p in reversed(made):
        try:
            p.rmdir()
        except OSError:
            pass


def epoch_savings(study: Any, sweep_dir: Path) -> Dict[str, Any]:
    """Epochs the study did not train thanks to pruning: ``epochs_not_trained`` of ``epochs_unpruned``
    (the epochs its COMPLETE and PRUNED trials would have trained unpruned)."""
    from optuna.trial import TrialState

    from launcher import cellstate

    skipped = total = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        cid = t.user_attrs.get("cell")
        if not cid:
            continue
        cell = cellstate.cell_dir(sweep_dir, cid)
        pruned = cellstate.read_pruned(cell) if t.state == TrialState.PRUNED else None
        if pruned is not None:
            p = pruned.get("pruned") or {}
            epoch, epochs = p.get("epoch"), p.get("epochs")
            if isinstance(epoch, int) and isinstance(epochs, int):
                skipped += max(0, epochs - epoch)
                total += epochs
            continue
        result = cellstate.read_result(cell) or {}
        epochs = (result.get("run") or {}).get("epochs")
        if isinstance(epochs, int):
            total += epochs
    return {"epochs_not_trained": skipped, "epochs_unpruned": total}


def closing_line(d: dict) -> str:
    """One line on the whole study: its trials by state, the best, what pruning saved, where it is."""
    parts = [f"{d['complete']} COMPLETE"]
    if d["pruned"]:
        parts.append(f"{d['pruned']} PRUNED")
    if d["failed"]:
        parts.append(f"{d['failed']} FAIL")
    if d["running"]:
        parts.append(f"{d['running']} RUNNING")
    line = f"study {d['name']!r}: {d['trials']} of {d['n_trials']} trials ({', '.join(parts)})"
    if d.get("best_value") is not None:
        params = " ".join(f"{k}={_fmt(v)}" for k, v in (d.get("best_params") or {}).items())
        line += f"; best {d['objective'][0]} {d['best_value']:.4f} (trial {d['best_trial']}: {params})"
    elif d.get("pareto_front"):
        line += f"; {len(d['pareto_front'])} trial(s) on the Pareto front"
    if d.get("epochs_not_trained"):
        share = d["epochs_not_trained"] / max(1, d["epochs_unpruned"])
        line += (f"; pruning saved {d['epochs_not_trained']} of {d['epochs_unpruned']} epochs ({share:.0%} of "
                 "the unpruned study's GPU time)")
    kind = " (Optuna journal file)" if d["storage_kind"] == "journal" else ""
    return line + f"\nstudy storage: {d['storage']}{kind}"


__all__ = ["OptunaSweeper", "OptunaSweeperConf", "PruneMonitor", "CellProgress", "ProgressSource", "Watched",
           "search_space", "storage_location", "open_storage", "read_study", "load_study", "register_configs"]
