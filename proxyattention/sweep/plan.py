"""Plan a sweep: compose and validate every job, add the paired baselines, name and write the cells.

Every job's config is checked before any cell folder is written, so a bad override (unknown option,
misspelt key, value out of range) stops the sweep before it starts, naming the override. Data read
from a root is checked once per dataset, and its content fingerprint joins the cells' configs and ids
(:class:`DataChecks`).

Composing a config through Hydra costs ~0.1 s, which would make a 10,000-cell sweep take a quarter
of an hour to plan. Grids vary few *config groups* (``model=…``, ``dataset=…``) and many plain values
(``proxy.threshold=…``), so :class:`Composer` composes each distinct group combination once through
Hydra, checks each distinct value override once with OmegaConf (struct mode: a misspelt key or a
wrong type fails there, as it would in Hydra), and builds each job's config from those pieces as
plain dicts. Anything it cannot do exactly — ``+key``/``~key`` overrides, interpolations between
keys, values that are lists — goes through Hydra. The first job of each group combination is built
both ways and compared (config and cell id); any difference turns the shortcut off for the sweep.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import yaml
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from launcher import cellstate, fileio, manifest
from launcher.manifest import CellRecord
from proxyattention import identity
from proxyattention.config import (
    GROUP_SCHEMAS,
    ConfigError,
    spell_targets,
    to_trial_config,
    validate,
)
from proxyattention.data import facts as data_facts
from proxyattention.data.registry import SOURCES
from proxyattention.data.samples import DataError
from proxyattention.schedule import ScheduleError

log = logging.getLogger(__name__)

# A ``${node.reference}`` (no resolver colon before the closing brace): its value depends on other keys.
_NODE_REF = re.compile(r"\$\{[^:}]*\}")
_MISSING = "???"
# ``group.key=<number>``: Hydra's grammar reads these as int / float exactly like int() / float().
_SIMPLE = re.compile(r"(?P<group>[a-z_]+)\.(?P<key>[a-z_][a-z0-9_]*)=(?P<value>[+-]?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?)\Z")
# Keys a baseline's overrides drop: they do not apply to a trial without proxy steps.
_PROXY_ONLY_PREFIXES = ("proxy.", "proxy=", "method.", "method=", "+proxy.", "+method.")

Compose = Callable[[list[str]], DictConfig]


class PlanError(CompactHydraException):
    """A job whose config cannot run; the message names the job's overrides and the offending key."""


@dataclass
class PlannedCell:
    record: CellRecord
    config: dict  # the plain, resolved trial config its config.yaml snapshot holds

    @property
    def id(self) -> str:
        return self.record.id


@dataclass
class Plan:
    """Every cell of a sweep, in run order (a baseline right before its first proxy cell)."""

    sweep_dir: Path
    plan_id: str  # hash of the job list: names the sweep definition in plans/
    cells: list[PlannedCell]
    job_cells: list[str]  # the cell id of each Hydra job, in job order
    datasets: list[dict] = field(default_factory=list)  # the data read from roots (DataChecks.datasets)

    def cell_dir(self, cid: str) -> Path:
        return cellstate.cell_dir(self.sweep_dir, cid)


# ---------------------------------------------------------------------------------------------------
# Validation of a plain trial dict


class _View(dict):
    """A plain trial dict whose groups read as attributes too, so ``config.validate`` runs on it."""

    __getattr__ = dict.__getitem__

    @classmethod
    def of(cls, plain: dict) -> "_View":
        return cls({g: cls(v) if isinstance(v, dict) else v for g, v in plain.items()})


# ---------------------------------------------------------------------------------------------------
# Composition


@dataclass
class _Base:
    cfg: DictConfig  # the trial part of the composed config, unresolved, struct
    plain: dict  # resolved plain copy (fast path only)


class Composer:
    """Compose, validate and identify the trial config of each job (see the module docstring)."""

    def __init__(self, compose: Compose, fast: bool = True) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        self._compose = compose
        self._parser = OverridesParser.create()
        self._kind: dict[str, Optional[tuple[str, str, Any]]] = {}  # override -> (group, key, value)
        self._bases: dict[tuple[str, ...], Optional[_Base]] = {}
        self._values: dict[tuple, Any] = {}  # (base, group, key, type, value) -> stored value
        self._checked: set[tuple[str, ...]] = set()
        self.fast = fast

    # -- Hydra, the reference path
    def slow(self, overrides: Sequence[str]) -> dict:
        """Compose through Hydra and validate; the plain, resolved trial config."""
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        try:
            cfg = self._compose(list(overrides))
            trial = to_trial_config(OmegaConf.masked_copy(cfg, [k for k in GROUP_SCHEMAS if k in cfg]))
        except ConfigError as e:
            raise PlanError(_job_msg(overrides, str(e))) from None
        except (HydraException, OmegaConfBaseException, ScheduleError) as e:
            msg = str(e)
            if e.__cause__ is not None and str(e.__cause__) not in msg:
                msg = f"{msg}\n{e.__cause__}"
            raise PlanError(_job_msg(overrides, msg)) from None
        return OmegaConf.to_container(trial, resolve=True)  # type: ignore[return-value]

    # -- the shortcut
    def classify(self, ov: str) -> Optional[tuple[str, str, Any]]:
        """``(group, key, value)`` of a plain ``group.key=value`` override, else None (composed by Hydra)."""
        if ov in self._kind:
            return self._kind[ov]
        kind = None
        m = _SIMPLE.match(ov)
        if m is not None and m["group"] in GROUP_SCHEMAS:  # a number: no need for Hydra's grammar
            text = m["value"]
            kind = (m["group"], m["key"], float(text) if "." in text else int(text))
        else:
            try:
                from hydra.core.override_parser.types import OverrideType

                o = self._parser.parse_override(ov)
                key = o.key_or_group
                parts = key.split(".")
                value = None if o.is_sweep_override() else o.value()
                if (o.type == OverrideType.CHANGE and o.package is None and not o.is_sweep_override()
                        and len(parts) == 2 and parts[0] in GROUP_SCHEMAS and "/" not in key
                        and isinstance(value, (str, int, float, bool, type(None)))
                        and not (isinstance(value, str) and "${" in value)):
                    kind = (parts[0], parts[1], value)
            except Exception:
                kind = None
        self._kind[ov] = kind
        return kind

    def _base(self, groups: tuple[str, ...]) -> Optional[_Base]:
        if groups in self._bases:
            return self._bases[groups]
        base = None
        try:
            cfg = self._compose(list(groups))
            trial = OmegaConf.masked_copy(cfg, list(GROUP_SCHEMAS))
            raw = OmegaConf.to_container(trial, resolve=False)
            eligible = all(isinstance(v, dict) for v in raw.values())
            plain: dict = {}
            for g, grp in raw.items():
                plain[g] = {}
                for k, v in grp.items():
                    if isinstance(v, (dict, list)):
                        eligible = False
                    elif isinstance(v, str) and "${" in v:
                        if _NODE_REF.search(v):
                            eligible = False
                        else:  # a resolver such as ${oc.env:HOME}: same value for every job
                            v = OmegaConf.select(trial, f"{g}.{k}")
                    plain[g][k] = v
            if eligible:
                base = _Base(cfg=trial, plain=plain)
        except Exception:
            base = None  # the Hydra path will say what is wrong
        self._bases[groups] = base
        return base

    def _value(self, base: _Base, group: str, key: str, value: Any) -> Any:
        """``value`` as the schema stores ``group.key`` (converted and type-checked like an override).

        Only the key's own node converts it: copying the whole config per value made planning
        thousands of distinct values take half a minute.
        """
        memo = (id(base), group, key, type(value), value)
        if memo not in self._values:
            node = base.cfg[group]._get_node(key)
            if node is None or isinstance(node, DictConfig) or node._get_flag("readonly") or value == _MISSING:
                raise ValueError("not a plain value")
            v = node.validate_and_convert(value)  # raises as Hydra would (the Hydra path names the key)
            if not isinstance(v, (str, int, float, bool, type(None))) or (isinstance(v, str) and "${" in v):
                raise ValueError("not a plain value")
            self._values[memo] = v
        return self._values[memo]

    def _fast(self, overrides: Sequence[str]) -> Optional[dict]:
        groups, values = [], []
        for ov in overrides:
            kind = self.classify(ov)
            if kind is None:
                groups.append(ov)
            else:
                values.append(kind)
        gkey = tuple(groups)
        base = self._base(gkey)
        if base is None:
            return None
        plain = {g: dict(v) for g, v in base.plain.items()}
        try:
            for group, key, value in values:
                if key not in plain[group]:
                    return None
                plain[group][key] = self._value(base, group, key, value)
        except Exception:
            return None
        if any(v == _MISSING for grp in plain.values() for v in grp.values()):
            return None
        plain = spell_targets(plain)
        try:
            validate(_View.of(plain))  # type: ignore[arg-type]
        except ConfigError as e:
            raise PlanError(_job_msg(overrides, str(e))) from None
        except Exception:
            return None
        if gkey not in self._checked:
            self._checked.add(gkey)
            reference = self.slow(overrides)
            if reference != plain:
                log.warning("planning shortcut disagrees with Hydra for %s; composing every job through "
                            "Hydra (slower)", " ".join(overrides))
                self.fast = False
                return reference
        return plain

    def trial(self, overrides: Sequence[str]) -> dict:
        """The validated, resolved trial config of one job, as plain nested dicts."""
        if self.fast:
            plain = self._fast(overrides)
            if plain is not None:
                return plain
        return self.slow(overrides)


def _job_msg(overrides: Sequence[str], msg: str) -> str:
    job = " ".join(overrides) if overrides else "(no overrides)"
    return f"bad override in the job [{job}]:\n  {msg.strip()}".replace("\n", "\n  ").rstrip()


# ---------------------------------------------------------------------------------------------------
# The plan


def baseline_overrides(overrides: Sequence[str], schedule: str) -> list[str]:
    """What names an added baseline: the proxy cell's overrides minus proxy/method ones, proxy off."""
    kept = [o for o in overrides if not o.startswith(_PROXY_ONLY_PREFIXES)]
    return kept + ["proxy=none", f"proxy.schedule={schedule}"]


def plan_sweep(job_overrides: Sequence[Sequence[str]], compose: Compose, sweep_dir: Path,
               fast: bool = True, max_errors: int = 5,
               progress: Optional[Callable[[int], None]] = None) -> Plan:
    """Compose and validate every job, add paired baselines (shared), and name the cells.

    Raises :class:`PlanError` listing the bad jobs (up to ``max_errors``) if any job cannot run.
    Writes nothing: see :func:`write_plan_files`.
    """
    composer = Composer(compose, fast=fast)
    data = DataChecks()
    cells: dict[str, PlannedCell] = {}
    order: list[str] = []
    job_cells: list[str] = []
    errors: list[str] = []
    n_bad = 0

    def add(cid: str, record: CellRecord, config: dict) -> None:
        if cid not in cells:
            cells[cid] = PlannedCell(record=record, config=config)
            order.append(cid)

    for i, overrides in enumerate(job_overrides):
        if progress is not None:
            progress(i)
        try:
            plain = composer.trial(overrides)
            data_ok = data.identify(plain, overrides)
        except PlanError as e:
            n_bad += 1
            if len(errors) < max_errors and str(e) not in errors:
                errors.append(str(e))
            job_cells.append("")
            continue
        if not data_ok:  # its dataset was refused for an earlier job: said once
            job_cells.append("")
            continue
        config, cid, base, bid = identity.planned(plain)
        if base is None:
            add(cid, CellRecord(id=cid, overrides=list(overrides), role="baseline"), config)
        else:
            assert bid is not None
            add(bid, CellRecord(id=bid, overrides=baseline_overrides(overrides, base["proxy"]["schedule"]),
                                role="baseline"), base)
            add(cid, CellRecord(id=cid, overrides=list(overrides), baseline=bid, role="proxy"), config)
        job_cells.append(cid)
    if errors:
        more = f"\n({n_bad - len(errors)} more bad jobs not shown)" if n_bad > len(errors) else ""
        raise PlanError("\n".join(errors) + more + "\nNo cell was started; fix the override and run again.")
    from proxyattention.sweep.estimate import (
        remember_plan,  # a dry run writes no config: it estimates from these
    )

    return remember_plan(Plan(sweep_dir=Path(sweep_dir), plan_id=manifest.plan_id(job_overrides),
                              cells=[cells[c] for c in order], job_cells=job_cells, datasets=data.datasets))


class DataChecks:
    """The data of a sweep's datasets read from a root, checked once per distinct dataset before any cell
    starts, and named in the cells' ids by content: :meth:`identify` writes the data's fingerprint into
    each job's config as ``dataset.fingerprint`` (see :mod:`proxyattention.data.facts`; cached by
    folder and modification time, so planning a big dataset again costs a few stats)."""

    def __init__(self) -> None:
        self._seen: dict[tuple, Optional[str]] = {}  # dataset -> its fingerprint, None when refused
        self.datasets: list[dict] = []  # each checked dataset as the plan records it

    def identify(self, plain: dict, overrides: Sequence[str]) -> bool:
        """Add the fingerprint of the data to ``plain`` (in place). False when this dataset was refused
        for an earlier job; the first refusal raises :class:`PlanError` naming the key and the job."""
        d = plain["dataset"]
        given = d.get("fingerprint")
        if not SOURCES[d["source"]].needs_root:
            if given is not None:
                raise PlanError(_job_msg(overrides, f"dataset.fingerprint={given} is set, but "
                                         f"dataset.source={d['source']} reads no folder; remove it"))
            return True
        key = tuple(d.get(k) for k in (*data_facts.KEYS, "num_classes", "fingerprint"))
        if key not in self._seen:
            self._seen[key] = None
            try:
                facts = data_facts.dataset_facts(d)
            except DataError as e:
                raise PlanError(_job_msg(overrides, str(e))) from None
            if d.get("num_classes") is not None and d["num_classes"] != len(facts.classes):
                raise PlanError(_job_msg(overrides, f"dataset.num_classes={d['num_classes']} but the data under "
                                         f"dataset.root={d['root']} has {len(facts.classes)} classes; "
                                         "remove the key or fix it"))
            if given is not None and given != facts.fingerprint:
                raise PlanError(_job_msg(overrides, f"dataset.fingerprint={given} but the data under "
                                         f"dataset.root={d['root']} has fingerprint {facts.fingerprint}; "
                                         "remove the override (the planner fills it in)"))
            self._seen[key] = facts.fingerprint
            entry = {**{k: d.get(k) for k in data_facts.KEYS}, "fingerprint": facts.fingerprint}
            if entry not in self.datasets:
                self.datasets.append(entry)
        fp = self._seen[key]
        if fp is None:
            return False
        d["fingerprint"] = fp
        return True


def data_still_holds(datasets: Sequence[dict]) -> bool:
    """Whether every dataset a recorded plan read still has the fingerprint its cells were named by."""
    for entry in datasets:
        try:
            if data_facts.dataset_facts(entry).fingerprint != entry.get("fingerprint"):
                return False
        except (DataError, KeyError, TypeError):
            return False
    return True


def snapshot_yaml(config: dict) -> str:
    """The ``config.yaml`` a cell runs from. Cells run in batch, so their progress bars are off.

    The text is ``yaml.safe_dump``'s, built from one remembered line per distinct ``key: value``:
    emitting 10,000 whole configs through PyYAML took most of the first planning of a big sweep.
    """
    c = {g: dict(v) for g, v in config.items()}
    if "progress" in c.get("train", {}):
        c["train"]["progress"] = False
    plain = all(isinstance(g, str) and g.isidentifier() and isinstance(s, dict) and s
                and all(isinstance(v, _SCALARS) for v in s.values()) for g, s in c.items())
    if not plain:
        return yaml.safe_dump(c, sort_keys=False, default_flow_style=False)
    parts = []
    for group, section in c.items():
        parts.append(f"{group}:\n")
        for key, value in section.items():
            memo = (key, type(value), value)
            line = _YAML_LINES.get(memo)
            if line is None:
                line = "".join("  " + ln for ln in yaml.safe_dump({key: value}, default_flow_style=False, width=78)
                               .splitlines(keepends=True))
                if len(_YAML_LINES) < 200_000:
                    _YAML_LINES[memo] = line
            parts.append(line)
    return "".join(parts)


_SCALARS = (str, int, float, bool, type(None))
_YAML_LINES: dict[tuple, str] = {}


def write_plan_files(plan: Plan, argv_overrides: Sequence[str] = (), fingerprint: str = "",
                     store: Optional[Path] = None) -> int:
    """Create missing cells with their ``config.yaml`` and record the sweep definition.

    With a ``store``, a cell lives in ``STORE/<id>`` and the sweep folder links it as ``cells/<id>``:
    every sweep that plans the same cell shares it — its claim, status and results — so a DONE cell is
    never trained again for another folder or command. A cell folder already in the sweep (planned
    without a store) stays where it is. An existing snapshot is never rewritten (a queued cell keeps the
    config it was planned with). Returns the number of new cells.

    A planned cell whose entry is not a folder is repaired, never a crash: a link whose store entry was
    deleted (dangling) is linked to a re-made store folder (the cell runs again), and a file in the
    place of a cell folder or store entry is moved aside as ``<id>.damaged-<stamp>`` first.
    """
    root = str(cellstate.cells_root(plan.sweep_dir))
    os.makedirs(root, exist_ok=True)
    if store is not None:
        os.makedirs(store, exist_ok=True)
        # Links are relative between the real folders: short (the filesystem keeps them in the inode)
        # and still right when a folder holding both the sweeps and the store is moved.
        store_rel = os.path.relpath(os.path.realpath(store), os.path.realpath(root))

    def write(cell: PlannedCell) -> bool:
        d = os.path.join(root, cell.id)
        if not os.path.isdir(d) and os.path.lexists(d):  # a dangling link, a link to a file, or a file
            if os.path.islink(d):
                log.warning("cell %s: %s; repaired", cell.id, cellstate.folder_problem(d))
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(d)
            else:
                log.warning("cell %s: a file was in the place of its folder; moved to %s", cell.id,
                            manifest.set_aside_entry(d))
        if store is not None and not os.path.lexists(d):
            target = os.path.join(store, cell.id)
            if os.path.lexists(target) and not os.path.isdir(target):
                log.warning("cell %s: its store entry was a file; moved to %s", cell.id,
                            manifest.set_aside_entry(target))
            try:
                os.mkdir(target)
            except FileExistsError:
                pass
            try:
                os.symlink(os.path.join(store_rel, cell.id), d, target_is_directory=True)
            except FileExistsError:  # another launcher linked it first: the same target
                pass
        else:
            os.makedirs(d, exist_ok=True)
        snap = os.path.join(d, fileio.CONFIG)
        data = snapshot_yaml(cell.config).encode()
        try:  # a new cell: one write() of a new file (a kill cannot split it; a crash may leave it empty)
            fd = os.open(snap, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if os.path.getsize(snap) > 0:  # planned before: its snapshot is never rewritten
                return False
            fileio.write_text_atomic(snap, data.decode(), fsync=False)  # empty: a write lost to a crash
            return True
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return True

    # Creating a cell is a few metadata operations, each waiting on the filesystem: overlap them.
    if len(plan.cells) > 256:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8) as pool:
            new = sum(pool.map(write, plan.cells, chunksize=64))
    else:
        new = sum(write(c) for c in plan.cells)
    manifest.write_plan(plan.sweep_dir, plan.plan_id, [c.record for c in plan.cells],
                        extra={"overrides": list(argv_overrides), "fingerprint": fingerprint,
                               "job_cells": plan.job_cells, "datasets": plan.datasets})
    return new


def fingerprint(config_dirs: Sequence[Path]) -> str:
    """A hash of everything besides the overrides that a job's composed config depends on.

    The YAML files of the config folders, the trial schema and schedule code, this planner, and
    Hydra's version, and the environment variables the YAML files read (``${oc.env:NAME}``). Same fingerprint and same jobs: the recorded plan still holds, so re-issuing a
    big sweep skips composing it again.
    """
    import hydra

    import proxyattention.config
    import proxyattention.identity
    import proxyattention.schedule

    h = hashlib.sha256(f"hydra {hydra.__version__}\n".encode())
    files = [Path(m.__file__) for m in (proxyattention.config, proxyattention.identity, proxyattention.schedule)]
    files.append(Path(__file__))
    for d in config_dirs:
        if Path(d).is_dir():
            files += sorted(p for p in Path(d).rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    env_names: set[str] = set()
    for f in files:
        h.update(str(f).encode() + b"\0")
        try:
            data = f.read_bytes()
        except OSError:
            data = b""
        h.update(data + b"\0")
        env_names.update(m.decode() for m in re.findall(rb"oc\.env:\s*([A-Za-z_][A-Za-z0-9_]*)", data))
    for name in sorted(env_names):  # e.g. dataset roots under ${oc.env:PROXYATTENTION_DATA,...}
        h.update(f"{name}={os.environ.get(name)}\0".encode())
    return h.hexdigest()[:16]


def cached_plan(sweep_dir: Path, job_overrides: Sequence[Sequence[str]], fp: str) -> Optional[Plan]:
    """The recorded plan of exactly these jobs, if nothing it depends on changed and its cells exist."""
    sweep_dir = Path(sweep_dir)
    pid = manifest.plan_id(job_overrides)
    d = fileio.read_json(sweep_dir / manifest.PLANS / f"{pid}.json")
    if d is None or not fp or d.get("fingerprint") != fp or len(d.get("job_cells", ())) != len(job_overrides):
        return None
    if not data_still_holds(d.get("datasets", ())):  # the data under a root changed: other cells
        return None
    cells = []
    root = str(cellstate.cells_root(sweep_dir))
    path = sweep_dir / manifest.PLANS / f"{pid}.json"
    records = manifest.plan_cells(path, d)  # ids checked: a crafted id never names a folder
    planned = {r.id for r in records}
    if any(not isinstance(j, str) or (j and j not in planned) for j in d["job_cells"]):
        raise manifest.PlanFileError(f"{path}: its job_cells name cells it does not plan; the file is damaged: "
                                     "remove it and re-issue the sweep command")
    for rec in records:
        if not os.path.exists(os.path.join(root, rec.id, fileio.CONFIG)):
            return None
        cells.append(PlannedCell(record=rec, config={}))
    return Plan(sweep_dir=sweep_dir, plan_id=pid, cells=cells, job_cells=list(d["job_cells"]),
                datasets=list(d.get("datasets", ())))


# ---------------------------------------------------------------------------------------------------
# Models: checked before any cell starts, without importing torch here


def model_check_cache() -> Path:
    """Where answers of :mod:`proxyattention.modelcheck` are remembered (per torch and timm version)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "proxyattention" / "model-checks.json"


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"torch {version('torch')} timm {version('timm')}"
    except PackageNotFoundError:
        return ""


def check_models(plan: Plan, hub_offline: Optional[bool] = None) -> None:
    """Refuse the plan, naming the key and a job, if a cell's ``model.name`` is not a timm model or its
    CAM target layer gives no real map at its ``dataset.image_size`` (what the trial would refuse); and,
    for ``model.pretrained=true``, if the weights are neither cached nor fetchable: not in the cache
    while the hub is offline (``hub_offline``; default: ``HF_HUB_OFFLINE`` is set). The cache is only
    looked at, never the network; online, weights not yet cached pass (the first cell downloads them).

    Each distinct (name, target layer, image size) is checked once per torch/timm version, in a
    subprocess that builds the model without weights on the meta device (see
    :mod:`proxyattention.modelcheck`); the answer is remembered in :func:`model_check_cache`. Where timm
    finds a model's weights is remembered the same way; whether they are cached is asked every time.
    """
    from proxyattention import weights

    specs: dict[str, tuple[dict, CellRecord]] = {}
    pretrained: dict[str, tuple[dict, CellRecord]] = {}
    for cell in plan.cells:
        if not cell.config:
            continue
        m, d = cell.config["model"], cell.config["dataset"]
        spec = {"name": m["name"], "target_layer": m.get("target_layer"), "image_size": d["image_size"]}
        key = json.dumps(spec, sort_keys=True)
        if key not in specs or specs[key][1].role == "baseline":  # name a job the user wrote
            specs[key] = (spec, cell.record)
        if m.get("pretrained"):
            wspec = {"weights": m["name"]}
            wkey = json.dumps(wspec)
            if wkey not in pretrained or pretrained[wkey][1].role == "baseline":
                pretrained[wkey] = (wspec, cell.record)
    if not specs:
        return
    versions = _versions()
    path = model_check_cache()
    cache = fileio.read_json(path) or {}
    known = cache.get(versions, {}) if isinstance(cache.get(versions), dict) else {}
    missing = [k for k in (*specs, *pretrained) if k not in known]
    if missing:
        every = {**specs, **pretrained}
        answers = _run_model_check([every[k][0] for k in missing])
        if answers is None:
            return  # the checker itself could not run: each trial still checks its model
        known.update(zip(missing, answers))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fileio.write_json_atomic(path, {versions: known})
        except OSError:
            pass  # a read-only home: check again next time
    errors = []
    bad_names = set()
    for key, (spec, record) in specs.items():
        error = known[key].get("error")
        if error:
            errors.append(_job_msg(record.overrides, error))
            bad_names.add(spec["name"])
    for key, (spec, record) in pretrained.items():
        answer = known[key]
        loc = answer.get("location") or {}
        if spec["weights"] in bad_names:
            continue
        if answer.get("error") or not weights.source(loc):
            errors.append(_job_msg(record.overrides, answer.get("error") or (
                f"model.pretrained=true but timm has no pretrained weights for model.name="
                f"{spec['weights']}; use model.pretrained=false, or model.weights=PATH")))
    if errors:
        raise PlanError("\n".join(errors) + "\nNo cell was started; fix the override and run again.")
    offline = weights.hub_offline() if hub_offline is None else hub_offline
    absent = [(spec["weights"], known[key]["location"]) for key, (spec, _) in pretrained.items()
              if weights.cached_path(known[key]["location"]) is None]
    if absent and offline:
        names = [n for n, _ in absent]
        what = ", ".join(f"{n} ({weights.describe(loc)})" for n, loc in absent)
        where = ", ".join(sorted({str(weights.cache_dir(loc)) for _, loc in absent}))
        raise PlanError(f"model.pretrained=true: the weights of {what} are not in the cache ({where}) "
                        f"and the hub is offline (HF_HUB_OFFLINE): "
                        f"{weights.fix_hint(names)}. No cell was started.")


def _run_model_check(specs: list[dict]) -> Optional[list[dict]]:
    import subprocess
    import sys

    why = "no answer"
    try:
        proc = subprocess.run([sys.executable, "-m", "proxyattention.modelcheck"], input=json.dumps(specs),
                              capture_output=True, text=True, timeout=600)
        if proc.returncode == 0:
            answers = json.loads(proc.stdout)
            if isinstance(answers, list) and len(answers) == len(specs):
                return answers
        why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        why = str(e)
    log.warning("could not check the models before the sweep (%s); each cell checks its own", why)
    return None
