"""What a sweep returns to Hydra for each job of an app that plans its own cells: the cell's objective, for
adaptive sweepers (Optuna). (Any other app's job returns its task function's return value.)

``hydra.launcher.objective`` names a metric of the cell's ``result.json`` (this project's trials: default
``val/acc_best``),
or a list of them for a multi-objective study (``hydra.sweeper.directions`` of the same length). A
metric computed on the test split is refused (``test/…``, and ``explain/…``, which the trial computes on
test images): a sweeper that selects on the test split reports a test score it has tuned to. Validation
metrics (``val/…``) are what a search is meant to select on; training-side numbers (``train/…``,
``proxy/…`` such as ``proxy/images``, a cost) are allowed as a second objective. With
``hydra.launcher.objective_vs_baseline=true`` each value is the paired gain ``proxy − baseline`` of that
metric (its shared paired baseline ran the same seed and epochs without proxy steps), which is what Proxy
Attention is meant to raise; a baseline job's gain is 0.

Explainability as an objective: with ``explain.val_images=N`` each trial also computes the explainability
metrics on N seeded validation images (the same for a cell and its baseline) as ``val/explain/ad``,
``val/explain/ai``, ``val/explain/ag``, ``val/explain/insertion``, ``val/explain/deletion`` (and
``val/explain/pointing`` on dataset=shapes): e.g. ``hydra.launcher.objective=[val/acc_best,val/explain/insertion]``
with ``hydra.sweeper.directions=[maximize,maximize]`` (AD and deletion are lower-better: ``minimize``). The
report draws such a study's Pareto front.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from launcher import cellstate

DEFAULT = "val/acc_best"
ALLOWED_PREFIXES = ("val/", "train/", "proxy/")


def names(spec: Any) -> list[str]:
    """The metric names of ``hydra.launcher.objective``: one name, or a list of names."""
    if spec is None:
        return [DEFAULT]
    if isinstance(spec, str):
        return [spec]
    return [str(n) for n in spec]


def check_objective(spec: Any) -> None:
    """Raise ``ValueError`` naming ``hydra.launcher.objective`` if a name is not a metric one may select on."""
    listed = spec if isinstance(spec, str) or spec is None else list(spec)
    if not isinstance(listed, (str, list)) or (isinstance(listed, list) and not listed):
        raise ValueError(f"hydra.launcher.objective={spec!r} must be a metric name such as {DEFAULT}, or a "
                         "list of them (one per direction of a multi-objective study)")
    for name in names(spec):
        if not name.startswith(ALLOWED_PREFIXES):
            raise ValueError(f"hydra.launcher.objective={name!r} must be a validation metric such as {DEFAULT} "
                             "(or a training-side one: train/…, proxy/…); a sweeper selecting on the test split "
                             "(test/…, explain/… on test images) would report a tuned test score")


def value(cell: Path, name: Any = DEFAULT, baseline: Optional[Path] = None) -> Any:
    """The cell's ``name`` metric, minus its baseline's when ``baseline`` is given; None if missing.
    ``name`` a list: the list of those values (None if any is missing)."""
    if not isinstance(name, str):
        values = [value(cell, n, baseline) for n in names(name)]
        return None if any(v is None for v in values) else values
    mine = _metric(cell, name)
    if mine is None or baseline is None:
        return mine
    base = _metric(baseline, name)
    return None if base is None else mine - base


def zero(name: Any) -> Any:
    """The gain of a job that is its own baseline: 0 (or a list of zeros)."""
    return 0.0 if isinstance(name, str) else [0.0] * len(names(name))


def _metric(cell: Path, name: str) -> Optional[float]:
    result = cellstate.read_result(cell) or {}
    v = (result.get("metrics") or {}).get(name)
    return None if v is None else float(v)
