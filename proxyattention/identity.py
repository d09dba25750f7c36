"""Cell identity: the one definition of which trial configs are "the same cell".

A cell id is the first 12 hex digits of the SHA-256 of the trial's *canonical* config: the plain,
resolved config with the schema's defaults filled in, values the trial treats as equal written one way
(``proxy.schedule=" 1,P,1"`` is ``1,p,1``; ``proxy.threshold=1`` is ``1.0``), a baseline's proxy and
CAM-method keys reset (they have no effect without proxy steps, so every proxy cell that pairs with the
same baseline names the same baseline), and nothing that depends on the machine:

- volatile keys (:data:`VOLATILE_KEYS`: device, threads, workers, progress bars, the cache folder) are
  dropped — they change how fast a trial runs, not what it computes; so are keys added to the schema
  later while they keep their neutral value (:data:`ADDED_KEYS`), and speed choices that became
  automatic are hashed at their former constant (:data:`PINNED_KEYS`): cells run before keep their ids;
- ``dataset.root`` never enters as a path. A dataset is identified by ``dataset.name`` and, for data
  read from a root, by what the data is: ``dataset.fingerprint``, the content fingerprint of its sample
  list (relative paths, sizes, labels), which the planner writes into each cell's snapshot
  (:mod:`proxyattention.data.facts`) and the trial checks against the data it loads. Two folders of
  the same name with other images are other cells; the same images elsewhere are the same cells.
  Planned on a login node, re-issued on a compute node or moved to another disk, a sweep recognises its
  own cells. Without a fingerprint (cells planned before it, single trials) the generic ``imagefolder``
  config adds its folder's *name* instead (``/data/my_images`` → ``my_images``), as ids always did.

Plain dicts in, plain values out: the trial, the sweep planner and the results table all call this
module, and it imports neither torch nor OmegaConf.
"""

from __future__ import annotations

import dataclasses
import os
from functools import lru_cache
from typing import Any, Mapping, Optional

from launcher import fileio
from proxyattention.config import GROUP_SCHEMAS, ProxyConfig
from proxyattention.schedule import parse_schedule

# Keys that never change what a trial computes: excluded from cell identity.
VOLATILE_KEYS: tuple[str, ...] = (
    "train.device", "train.num_threads", "train.progress", "dataset.num_workers", "dataset.cache_dir",
)
# Speed choices that were part of identity before they became automatic: hashed at the value they
# always had then, so cells run before keep their ids (``train.channels_last`` is now ``auto``).
PINNED_KEYS: dict[str, Any] = {"train.channels_last": False, "dataset.in_memory": "auto",
                               "dataset.max_memory_mb": 2048,
                               "train.lr": 0.001}  # retired: it never had an effect
# Keys added to the schema after cells were run: they enter an id only when set to a value other than
# the one that reproduces the earlier behaviour, so earlier cells keep their ids.
ADDED_KEYS: dict[str, Any] = {"dataset.val_max": None, "proxy.p_trains": False, "explain.target": "true",
                              "explain.fill": "black"}
# The content fingerprint of data read from a root, which the planner writes into each cell's snapshot:
# cells planned before it (and single trials, which no planner names) hash as they did.
ADDED_KEYS["dataset.fingerprint"] = None
# Deterministic GPU algorithms: off is how every earlier cell ran.
ADDED_KEYS["train.deterministic"] = False
# Explainability metrics on validation images (val/explain/*): none is how every earlier cell ran.
ADDED_KEYS["explain.val_images"] = 0
# A baseline's proxy and method groups as they are hashed: fixed values (the defaults these groups had
# when ids were first defined), so a later change of a proxy default never renames a baseline.
BASELINE_PROXY: dict[str, Any] = {"enabled": False, "threshold": 0.4, "weight": 0.8, "subset": 1.0, "mode": "blend",
                                  "target": "predicted", "clear_every_step": True, "log_images": 8, "dump": False}
BASELINE_METHOD: dict[str, Any] = {"name": "gradcampp", "impl": "auto", "batch_size": 64}
EIGEN_METHODS = ("eigencam", "eigengradcam")  # their native maps took an oriented sign (see cam.py)
# Datasets named only by their folder: their folder's name joins the identity.
FOLDER_NAMED_DATASETS = ("imagefolder",)

Plain = dict[str, dict[str, Any]]


@lru_cache(maxsize=1)
def _defaults() -> dict[str, dict[str, Any]]:
    return {g: dataclasses.asdict(s()) for g, s in GROUP_SCHEMAS.items()}


@lru_cache(maxsize=1)
def _float_fields() -> dict[str, tuple[str, ...]]:
    """The float fields of each group's schema."""
    return {g: tuple(f.name for f in dataclasses.fields(s) if f.type in ("float", float))
            for g, s in GROUP_SCHEMAS.items()}


def _plain(cfg: Mapping[str, Any]) -> dict:
    """A plain nested dict of ``cfg`` (an OmegaConf config is resolved first)."""
    if type(cfg).__name__ == "DictConfig":
        from omegaconf import OmegaConf

        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return {k: dict(v) if type(v) is dict or isinstance(v, Mapping) else v for k, v in cfg.items()}


def complete(cfg: Mapping[str, Any]) -> Plain:
    """The trial groups of ``cfg`` with the schema's defaults filled in and one spelling per value.

    Ints in float fields become floats and the schedule its canonical text. ``cfg`` must already be
    valid (``config.validate``); keys outside the trial groups (``hydra``) are dropped.
    """
    plain = _plain(cfg)
    floats = _float_fields()
    out: Plain = {}
    for group, defaults in _defaults().items():
        sect = {**defaults, **(plain.get(group) or {})}
        for k in floats[group]:
            if type(sect[k]) is int:  # not bool
                sect[k] = float(sect[k])
        out[group] = sect
    out["proxy"]["schedule"] = parse_schedule(out["proxy"]["schedule"]).text
    return out


def is_baseline(cfg: Mapping[str, Any]) -> bool:
    """A trial without proxy steps: proxy off, or a schedule without ``p``."""
    p = cfg["proxy"]
    return (not p.get("enabled", True)) or not parse_schedule(p.get("schedule", ProxyConfig.schedule)).has_proxy


def normalised(cfg: Mapping[str, Any]) -> Plain:
    """:func:`complete`, with a baseline's proxy and method groups reset (what its snapshot holds)."""
    return _normalise(complete(cfg))


def _normalise(c: Plain) -> Plain:
    """``c`` (complete, its own dicts) with a baseline's proxy and method groups reset, in place."""
    if is_baseline(c):
        c["proxy"] = {**BASELINE_PROXY, "schedule": _baseline_schedule(c["proxy"])}
        c["method"] = dict(BASELINE_METHOD)
    return c


def _baseline_schedule(proxy: Mapping[str, Any]) -> str:
    """The epochs a baseline of ``proxy``'s schedule trains (a ``p`` counts when ``proxy.p_trains``)."""
    return parse_schedule(proxy["schedule"], p_trains=bool(proxy.get("p_trains", False))).baseline.text


def baseline_of(cfg: Mapping[str, Any]) -> Plain:
    """The paired baseline of a trial: same everything, proxy off, schedule without the ``p`` steps."""
    return _baseline_of_complete(complete(cfg))


def _baseline_of_complete(c: Plain) -> Plain:
    b = {g: dict(v) for g, v in c.items()}
    b["proxy"]["schedule"] = _baseline_schedule(b["proxy"])
    b["proxy"]["enabled"] = False
    b["proxy"]["p_trains"] = False
    return _normalise(b)


def planned(cfg: Mapping[str, Any]) -> tuple[Plain, str, Optional[Plain], Optional[str]]:
    """What the planner needs of one job, each piece computed once: ``(config its snapshot holds, cell
    id, paired baseline's config or None for a baseline, baseline id or None)``."""
    c = complete(cfg)
    if is_baseline(c):
        c = _normalise(c)
        return c, _digest(_canonicalise(c)), None, None
    base = _baseline_of_complete(c)
    return c, _digest(_canonicalise(c)), base, _digest(_canonicalise(base))


def data_identity(dataset: Mapping[str, Any]) -> Optional[str]:
    """What stands for ``dataset.root`` in an id: None, or the folder's name for folder-named datasets
    without a content fingerprint (one names the data itself, wherever and under whatever name it lives)."""
    root = dataset.get("root")
    if not root or dataset.get("fingerprint") or dataset.get("name") not in FOLDER_NAMED_DATASETS:
        return None
    return os.path.basename(os.path.normpath(os.path.expanduser(str(root))))


def canonical(cfg: Mapping[str, Any]) -> Plain:
    """The trial as it affects results (see the module docstring)."""
    return _canonicalise(normalised(cfg))


def _canonicalise(normal: Plain) -> Plain:
    """:func:`canonical` of a config :func:`normalised` already (left unchanged)."""
    c = {g: dict(v) for g, v in normal.items()}
    for key in VOLATILE_KEYS:
        group, name = key.split(".")
        c[group].pop(name, None)
    for key, value in PINNED_KEYS.items():
        group, name = key.split(".")
        c[group][name] = value
    for key, neutral in ADDED_KEYS.items():
        group, name = key.split(".")
        if c[group].get(name, neutral) == neutral:
            c[group].pop(name, None)
    c["dataset"]["root"] = data_identity(c["dataset"])
    _mark_changed_behaviour(c)
    return c


def _mark_changed_behaviour(c: Plain) -> None:
    """Cells whose results changed under unchanged keys get a marker, so a cell computed before the
    change is never taken for one computed after it: the eigen methods' native maps now take an
    oriented sign (cam.py), which changes the maps a proxy step or the explain metrics use. EigenCAM's
    sign is the channel-sum rule (``oriented``); EigenGradCAM's follows GradCAM's map
    (``oriented-gradcam``), which replaced the channel-sum rule and changed its maps again."""
    sign = {"eigencam": "oriented", "eigengradcam": "oriented-gradcam"}
    explain, method = c["explain"], c["method"]
    if explain.get("enabled", True) and explain["method"] in EIGEN_METHODS and explain["impl"] != "library":
        explain["eigen_sign"] = sign[explain["method"]]
    if c["proxy"].get("enabled", True) and method["name"] in EIGEN_METHODS and method["impl"] != "library":
        method["eigen_sign"] = sign[method["name"]]


def _digest(obj: Any) -> str:
    return fileio.digest(obj)


def cell_id(cfg: Mapping[str, Any]) -> str:
    """A stable 12-hex-digit id of the trial: same canonical config, same id, on any machine."""
    return _digest(canonical(cfg))


def config_id(cfg: Mapping[str, Any]) -> str:
    """The id of the trial's configuration without its seed: the seeds of one configuration share it."""
    c = canonical(cfg)
    c["train"].pop("seed", None)
    return _digest(c)


def ids(cfg: Mapping[str, Any]) -> tuple[str, str, Optional[str]]:
    """(cell id, configuration id, paired baseline id or None for a baseline) in one pass."""
    c = complete(cfg)
    base = None if is_baseline(c) else cell_id(baseline_of(c))
    return cell_id(c), config_id(c), base


