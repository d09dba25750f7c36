"""What the cells of a dry run would cost: their epochs, and their time estimated from DONE cells.

Both backends' dry runs print :func:`dry_run_estimate` under their listing. For the cells that would
run it counts each cell's epochs as the trial does (:func:`cell_epochs`: the epochs of its
``proxy.schedule``, a ``p`` counting one when ``proxy.p_trains``; a baseline trains the same number),
groups the cells by model, dataset, image size and device type, and estimates each group's time from
the DONE cells of the store that share all four.

**What a DONE cell tells** (its ``result.json``; ``status.json`` holds none of model, dataset, device or
epochs): the seconds of its epochs, ``timing.train_s + proxy_s + eval_s`` (kept over resumed attempts),
divided by its epochs, and the seconds it spent once, the rest of ``timing.total_s`` (setup, test,
explainability). A cell estimate is ``per cell + per epoch × its epochs``, each the mean over the
matching DONE cells.

**Device type** of a cell that would run: ``train.device`` when it is ``cpu`` or ``cuda``; for ``auto``,
``cuda`` when the backend gives the cell a GPU (local: the GPUs found, ``hydra.launcher.gpus``,
``CUDA_VISIBLE_DEVICES`` or ``nvidia-smi``; Slurm: ``gres`` or ``gpus_per_node``), else ``cpu``. A DONE
cell matches on the device type its result records; the GPU models it ran on are named beside the
estimate, never matched (which model a Slurm job gets is the scheduler's choice).

**Reading the store.** Only when dry-running, once: one pass over the store's entries (and the sweep
folder's own cells when they do not live in the store), each read through the tolerant
:func:`launcher.cellstate.read_status` (a DONE status is trusted only while its ``result.json``
has the size it finished with); only a DONE cell's ``result.json`` is opened, and parsed from its
``timing`` on (:func:`read_result_tail`: its per-epoch ``history`` is skipped). A DAMAGED or unreadable
entry is skipped and counted, never an error. The configs of the cells that would run come from the plan in memory
(:func:`remember_plan`), else from their ``config.yaml`` (a recorded plan), of which only the few keys
needed are parsed.
"""

from __future__ import annotations

import json
import math
import os
import re
import weakref
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from launcher import cellstate, fileio
from launcher.cellstate import CellState
from launcher.console import fmt_duration
from proxyattention.schedule import ScheduleError, parse_schedule

GROUP_LINES = 20  # groups listed one a line; beyond, a count
PARALLEL_FROM = 256  # entries from which the store is read by a pool of threads (network filesystems)
NO_MATCH = "no DONE cell with this model, dataset and device to estimate from"

Key = tuple[str, str, Any, str]  # model name, dataset name, image size, device type
_BAD = (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError, ScheduleError)


# ---------------------------------------------------------------------------------------------------
# One cell


def cell_epochs(config: Mapping[str, Any]) -> int:
    """The epochs a trial of ``config`` trains, counted as :mod:`proxyattention.train` counts them."""
    proxy = config["proxy"]
    return parse_schedule(proxy["schedule"], p_trains=bool(proxy.get("p_trains", False))).epochs


def device_type(config: Mapping[str, Any], gpu: bool) -> str:
    """``cpu`` or ``cuda``: ``train.device`` when set to one, else whether the cell gets a GPU."""
    wanted = str((config.get("train") or {}).get("device", "auto"))
    if wanted in ("cpu", "cuda"):
        return wanted
    return "cuda" if gpu else "cpu"


def _size(value: Any) -> Any:
    """An image size as a hashable, comparable value (``224`` whether written 224 or 224.0)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, (int, float, str)) else str(value)


def cell_key(config: Mapping[str, Any], kind: str) -> Key:
    data = config["dataset"]
    return str(config["model"]["name"]), str(data["name"]), _size(data["image_size"]), kind


@dataclass(frozen=True)
class Sample:
    """What one DONE cell tells about its group: seconds per epoch, seconds once per cell, its device."""

    key: Key
    device: str
    epoch_s: float
    cell_s: float


def _seconds(timing: Mapping[str, Any], name: str) -> Optional[float]:
    v = timing.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        return None
    return float(v)


def sample_of(result: Mapping[str, Any]) -> Optional[Sample]:
    """The :class:`Sample` of a finished ``result.json``, or None when it lacks what one needs."""
    try:
        config = result["config"]
        device = result.get("device") or {}
        run = result.get("run") or {}
        kind = device.get("type") or str(run.get("device") or "").split(":")[0]
        if not kind:
            return None
        epochs = run.get("epochs")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            epochs = cell_epochs(config)
        timing = result.get("timing") or {}
        parts = [_seconds(timing, k) for k in ("train_s", "proxy_s", "eval_s")]
        total = _seconds(timing, "total_s")
        per = sum(p for p in parts if p is not None)
        if per <= 0:  # only a total: all of it per epoch
            if not total:
                return None
            per, once = total, 0.0
        elif total is None or result.get("resumed_from_epoch") is not None:  # total_s: the last attempt only
            once = sum(_seconds(timing, k) or 0.0 for k in ("setup_s", "explain_s"))
        else:
            once = max(0.0, total - per)
        return Sample(cell_key(config, str(kind)), str(device.get("name") or kind), per / epochs, once)
    except _BAD:
        return None


# ---------------------------------------------------------------------------------------------------
# The store


@dataclass
class StoreScan:
    """The DONE cells read from the store: their samples, and how many entries were skipped."""

    samples: list[Sample] = field(default_factory=list)
    damaged: int = 0  # DAMAGED or unreadable entries
    unusable: int = 0  # DONE, but their result lacks the config, device or timing an estimate needs
    where: str = ""


def _entries(store: Optional[Path], sweep_dir: Path) -> list[str]:
    """The store's cell entries, and the sweep folder's cells that are not links into it."""
    paths: dict[str, str] = {}
    folders = ([(str(store), False)] if store is not None else []) + [
        (str(cellstate.cells_root(sweep_dir)), store is not None)]
    for folder, skip_links in folders:
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    try:
                        if cellstate.is_cell_id(entry.name) and not (skip_links and entry.is_symlink()):
                            paths.setdefault(entry.name, entry.path)
                    except OSError:
                        continue
        except OSError:  # no such folder (a new store or sweep), or unreadable
            continue
    return list(paths.values())


# Where the members an estimate reads begin in a ``result.json`` as the trial writes it (``indent=1``,
# ``timing`` after the long ``history``): a line holding a top-level key (one space of indent; a string
# never holds a raw newline). From there to the end is an object of its own once a ``{`` opens it.
_TAIL = b'\n "timing": '
_TAIL_KEYS = ("timing", "run", "config")


def read_result_tail(path: str) -> Optional[dict]:
    """The members of a DONE cell's ``result.json`` an estimate reads (``timing`` to the end), without
    parsing its per-epoch ``history``; a file laid out otherwise is read whole by
    :func:`launcher.cellstate.read_result`. None when it cannot be read."""
    try:
        with open(os.path.join(path, fileio.RESULT), "rb") as f:
            data = f.read()
    except OSError:
        return None
    at = data.find(_TAIL)
    if at >= 0:
        try:
            tail = json.loads(b"{" + data[at:])
        except ValueError:
            tail = None
        if isinstance(tail, dict) and all(k in tail for k in _TAIL_KEYS):
            return tail
    return cellstate.read_result(Path(path))


def _read(path: str) -> tuple[str, Optional[Sample]]:
    try:
        status = cellstate.read_status(path)  # DONE only with a result.json of the size it finished with
        if status.state == CellState.DAMAGED:
            return "damaged", None
        if status.state != CellState.DONE:
            return "other", None
        result = read_result_tail(path)
        if result is None:  # replaced since its status was read
            return "damaged", None
        sample = sample_of(result)
        return ("done", sample) if sample is not None else ("unusable", None)
    except _BAD:
        return "damaged", None


def scan_store(store: Optional[Path], sweep_dir: Path) -> StoreScan:
    """Every DONE cell of the store (see the module docstring); never raises for a damaged entry."""
    paths = _entries(store, sweep_dir)
    if len(paths) > PARALLEL_FROM:
        with ThreadPoolExecutor(max_workers=8) as pool:
            read = list(pool.map(_read, paths, chunksize=64))
    else:
        read = [_read(p) for p in paths]
    scan = StoreScan(where=str(store if store is not None else cellstate.cells_root(sweep_dir)))
    for what, sample in read:
        if sample is not None:
            scan.samples.append(sample)
        elif what == "damaged":
            scan.damaged += 1
        elif what == "unusable":
            scan.unusable += 1
    return scan


# ---------------------------------------------------------------------------------------------------
# The configs of the cells that would run


_PLAN: Optional[weakref.ReferenceType] = None


def remember_plan(plan: Any) -> Any:
    """Called by the planner with each plan it makes (returned unchanged): a dry run reads the configs
    of its cells from it, as nothing is written. Only a weak reference is kept."""
    global _PLAN
    _PLAN = weakref.ref(plan)
    return plan


def _planned_configs() -> dict[str, dict]:
    plan = _PLAN() if _PLAN is not None else None
    if plan is None:
        return {}
    return {c.id: c.config for c in plan.cells if c.config}


_SNAPSHOT_KEYS = {("model", "name"), ("dataset", "name"), ("dataset", "image_size"), ("proxy", "schedule"),
                  ("proxy", "p_trains"), ("train", "device")}
_REQUIRED = {("model", "name"), ("dataset", "name"), ("dataset", "image_size"), ("proxy", "schedule")}


_INT = re.compile(r"[-+]?[0-9]+\Z")
_SCHEDULE = re.compile(r"[0-9]+(?:,[0-9pP]+)+\Z")
# A plain YAML scalar that is a string as written: no leading digit, sign or dot (numbers, dates), and
# not one of the words YAML 1.1 reads as null or a boolean.
_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_.,/+-]*\Z")
_YAML_WORDS = {"null", "yes", "no", "on", "off", "y", "n", "true", "false"}


def _scalar(text: str) -> Any:
    """A one-line YAML scalar as ``yaml.safe_dump`` writes the values these keys hold; ValueError for any
    other spelling (the caller then parses the whole file)."""
    if text in ("true", "false"):
        return text == "true"
    if _INT.match(text):
        return int(text)
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1].replace("''", "'")
    if _SCHEDULE.match(text):  # 1,p,1
        return text
    if _PLAIN.match(text) and text.lower() not in _YAML_WORDS:
        try:
            float(text)  # inf, nan, infinity: left to YAML
        except ValueError:
            return text
    raise ValueError(text)


def snapshot_config(text: str) -> Optional[dict]:
    """The keys an estimate needs from a cell's ``config.yaml``, or None when they cannot be read.

    The planner writes one ``group:`` line and then one ``  key: value`` line per key
    (:func:`proxyattention.sweep.plan.snapshot_yaml`), so the few needed lines are picked and read alone; a file
    laid out otherwise, or a value spelt otherwise, is parsed whole by YAML."""
    out: dict = {}
    found = 0
    group = None
    try:
        for line in text.splitlines():
            if not line.startswith(" "):
                group = line[:-1] if line.endswith(":") else None
                continue
            key, sep, value = line[2:].partition(": ")
            if group is not None and sep and (group, key) in _SNAPSHOT_KEYS:
                out.setdefault(group, {})[key] = _scalar(value.strip())
                found += (group, key) in _REQUIRED
        if found == len(_REQUIRED):
            return out
    except ValueError:
        pass
    import yaml

    try:
        whole = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        return None
    return whole if isinstance(whole, dict) else None


def _config_of(cid: str, planned: Mapping[str, dict], sweep_dir: Path, store: Optional[Path]) -> Optional[Mapping]:
    config = planned.get(cid)
    if config is not None:
        return config
    for base in (str(cellstate.cells_root(sweep_dir)), str(store) if store is not None else None):
        if base is None:
            continue
        try:
            with open(os.path.join(base, cid, fileio.CONFIG), encoding="utf-8") as f:
                text = f.read()
        except (OSError, ValueError):
            continue
        return snapshot_config(text)
    return None


# ---------------------------------------------------------------------------------------------------
# The estimate


@dataclass
class Group:
    """The cells that would run of one (model, dataset, image size, device type), and their estimate."""

    key: Optional[Key]  # None: cells whose config could not be read
    epochs: list[int] = field(default_factory=list)  # of each cell
    samples: list[Sample] = field(default_factory=list)

    @property
    def cells(self) -> int:
        return len(self.epochs)

    @property
    def epoch_s(self) -> Optional[float]:
        """Mean seconds per epoch of the matching DONE cells (None: none matches)."""
        return sum(s.epoch_s for s in self.samples) / len(self.samples) if self.samples else None

    @property
    def cell_s(self) -> Optional[float]:
        """Mean seconds once per cell of the matching DONE cells."""
        return sum(s.cell_s for s in self.samples) / len(self.samples) if self.samples else None

    def cell_estimate(self, epochs: int) -> Optional[float]:
        if not self.samples:
            return None
        assert self.epoch_s is not None and self.cell_s is not None
        return self.cell_s + self.epoch_s * epochs

    @property
    def seconds(self) -> Optional[float]:
        """The group's estimate: per cell once, per epoch for every epoch of every cell."""
        if not self.samples:
            return None
        assert self.epoch_s is not None and self.cell_s is not None
        return self.cell_s * self.cells + self.epoch_s * sum(self.epochs)


@dataclass
class Estimate:
    groups: list[Group]
    scan: StoreScan

    @property
    def cells(self) -> int:
        return sum(g.cells for g in self.groups)

    @property
    def epochs(self) -> int:
        return sum(sum(g.epochs) for g in self.groups)

    def hours(self, kind: str) -> float:
        return sum(g.seconds or 0.0 for g in self.groups if g.key is not None and g.key[3] == kind) / 3600

    @property
    def estimated_cells(self) -> int:
        return sum(g.cells for g in self.groups if g.samples)

    @property
    def longest_s(self) -> Optional[float]:
        times = [g.cell_estimate(max(g.epochs)) for g in self.groups if g.samples]
        return max((t for t in times if t is not None), default=None)


def estimate(sweep_dir: Path, cell_ids: Sequence[str], store: Optional[str | Path], gpu: bool) -> Estimate:
    """Group the cells ``cell_ids`` and estimate each group from the DONE cells of ``store`` (or, with no
    store, of the sweep folder)."""
    sweep_dir = Path(sweep_dir)
    store_path = Path(store).absolute() if store else None
    planned = _planned_configs()
    groups: dict[Optional[Key], Group] = {}
    for cid in cell_ids:
        config = _config_of(cid, planned, sweep_dir, store_path)
        key: Optional[Key] = None
        epochs = 0
        if config is not None:
            try:
                key, epochs = cell_key(config, device_type(config, gpu)), cell_epochs(config)
            except _BAD:
                key, epochs = None, 0
        groups.setdefault(key, Group(key)).epochs.append(epochs)
    scan = scan_store(store_path, sweep_dir) if cell_ids else StoreScan()
    for s in scan.samples:
        if s.key in groups:
            groups[s.key].samples.append(s)
    return Estimate(groups=list(groups.values()), scan=scan)


# ---------------------------------------------------------------------------------------------------
# What the dry run prints


def _n(count: int, word: str, plural: str = "") -> str:
    return f"{count} {word if count == 1 else plural or word + 's'}"


def _secs(seconds: float) -> str:
    return f"{seconds:.1f}" if seconds >= 1 or seconds == 0 else f"{seconds:.2g}"


def _hours(hours: float) -> str:
    return "<0.01" if 0 < hours < 0.01 else f"{hours:.2f}" if hours < 10 else f"{hours:.1f}"


def _epochs(epochs: list[int]) -> str:
    """``2 cells × 23 epochs = 46 epochs``, or the mix when the cells differ."""
    counts = Counter(epochs)
    total = sum(epochs)
    if len(counts) == 1:
        (e, n), = counts.items()
        return f"{_n(n, 'cell')} × {_n(e, 'epoch')}" + (f" = {total} epochs" if n > 1 else "")
    if len(counts) <= 3:
        mix = ", ".join(f"{n} × {e}" for e, n in sorted(counts.items()))
        return f"{_n(len(epochs), 'cell')} ({mix} epochs) = {total} epochs"
    return f"{_n(len(epochs), 'cell')} of {min(epochs)}–{max(epochs)} epochs = {total} epochs"


def _devices(samples: list[Sample]) -> str:
    names = Counter(s.device for s in samples).most_common()
    shown = ", ".join(name if n == 1 or len(names) == 1 else f"{name} ×{n}" for name, n in names[:3])
    return shown + (f", {len(names) - 3} more" if len(names) > 3 else "")


def _label(key: Optional[Key]) -> str:
    if key is None:
        return "config not readable"
    model, data, size, kind = key
    return f"{model}, {data} at {size} px, {kind}"


def group_line(g: Group) -> str:
    if g.key is None:
        return (f"{_n(g.cells, 'cell')}: no config.yaml to read the model, dataset and schedule from; "
                "no estimate")
    head = f"{_label(g.key)}: {_epochs(g.epochs)}"
    if not g.samples:
        return f"{head}: {NO_MATCH}"
    assert g.epoch_s is not None and g.cell_s is not None and g.seconds is not None
    return (f"{head}; {_secs(g.epoch_s)} s/epoch + {_secs(g.cell_s)} s/cell from "
            f"{_n(len(g.samples), 'DONE cell')} ({_devices(g.samples)}) → {fmt_duration(g.seconds)}")


def format_estimate(est: Estimate, gpu: Optional[str], timeout_min: Optional[float] = None) -> str:
    scan = est.scan
    skipped = [f"{_n(scan.damaged, 'damaged entry', 'damaged entries')} skipped"] if scan.damaged else []
    if scan.unusable:
        skipped.append(f"{_n(scan.unusable, 'DONE cell')} without the config, device or timing to use")
    lines = [f"estimate for the {_n(est.cells, 'cell')} that would run ({scan.where} holds "
             f"{_n(len(scan.samples), 'DONE cell')} to estimate from"
             + (f"; {'; '.join(skipped)}" if skipped else "") + "):"]
    shown = est.groups[:GROUP_LINES]
    lines += ["  " + group_line(g) for g in shown]
    rest = est.groups[len(shown):]
    if rest:
        lines.append(f"  … and {_n(len(rest), 'more group')} ({_n(sum(g.cells for g in rest), 'cell')}, "
                     f"{sum(g.cells for g in rest if g.samples)} with an estimate)")
    kinds = {g.key[3] for g in est.groups if g.samples and g.key is not None}
    hours = [f"{_hours(est.hours(kind))} {what}" for kind, what in (
        ("cuda", "GPU-hours (one GPU per cell)"), ("cpu", "CPU-hours (cell wall time)")) if kind in kinds]
    estimated = est.estimated_cells
    total = f"  total: {_n(est.cells, 'cell')}, {_n(est.epochs, 'epoch')}; "
    missing = est.cells - estimated
    if not estimated:
        total += "no estimate (no cell has a DONE cell to estimate from)"
    elif not missing:
        total += f"estimate {' + '.join(hours)} for every cell"
    else:
        total += (f"estimate {' + '.join(hours)} for the {_n(estimated, 'cell')} with one, "
                  f"{_n(missing, 'cell')} without")
    longest = est.longest_s
    if longest is not None:
        total += f"; longest cell ≈ {fmt_duration(longest)}"
        if timeout_min:
            over = longest > 60 * float(timeout_min)
            total += f" ({'longer than' if over else 'within'} hydra.launcher.timeout_min={timeout_min:g})"
    lines.append(total)
    lines.append(f"  how: matched on model, dataset, image size and device type (train.device; for auto, cuda when "
                 f"the cells get a GPU, here {gpu or 'none'}, else cpu; GPU models named, not matched); per epoch, "
                 "the DONE cells' training, validation and proxy-step seconds (result.json timing); per cell, "
                 "the rest of their trial time")
    return "\n".join(lines)


def dry_run_estimate(sweep_dir: Path, cell_ids: Sequence[str], store: Optional[str | Path],
                     gpu: Optional[str] = None, timeout_min: Optional[float] = None) -> str:
    """The dry run's lines about the cells ``cell_ids`` that would run. ``gpu`` says how the cells get a
    GPU (None: they get none); ``timeout_min`` is the backend's limit per cell, compared with the longest."""
    if not cell_ids:
        return "estimate: no cell would run"
    return format_estimate(estimate(sweep_dir, cell_ids, store, gpu=bool(gpu)), gpu, timeout_min)
