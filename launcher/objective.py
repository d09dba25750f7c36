"""What a sweep returns to Hydra for each job of an app that plans its own cells: the cell's objective, for
adaptive sweepers (Optuna). (Any other app's job returns its task function's return value.)

``hydra.launcher.objective`` names a metric of the cell's ``result.json`` (None: the app's default,
:attr:`launcher.apps.App.default_objective`), or a list of them for a multi-objective study
(``hydra.sweeper.directions`` of the same length). Which metrics an app lets a search select on is the
app's rule (:meth:`launcher.apps.App.check_options`; this project's trials refuse test-split metrics).
With ``hydra.launcher.objective_vs_baseline=true`` each value is the gain of the cell over its paired
baseline cell (``cell − baseline`` of that metric); a job that is its own baseline gains 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from launcher import cellstate

RETURN_VALUE = "return_value"  # the metric a task-function cell records: what the function returned


def names(spec: Any, default: str = RETURN_VALUE) -> list[str]:
    """The metric names of ``hydra.launcher.objective``: one name, or a list of names (None: ``default``)."""
    if spec is None:
        return [default]
    if isinstance(spec, str):
        return [spec]
    return [str(n) for n in spec]


def check_objective(spec: Any) -> None:
    """Raise ``ValueError`` naming ``hydra.launcher.objective`` unless it is null, a metric name or a
    non-empty list of them."""
    if spec is None or (isinstance(spec, str) and spec):
        return
    try:
        listed = [] if isinstance(spec, str) else list(spec)
    except TypeError:  # a number, a mapping's scalar: not a name
        listed = []
    if not listed or not all(isinstance(n, str) and n for n in listed):
        raise ValueError(f"hydra.launcher.objective={spec!r} must be a metric name of the cells' result.json, or "
                         "a list of them (one per direction of a multi-objective study)")


def value(cell: Path, name: Any = RETURN_VALUE, baseline: Optional[Path] = None) -> Any:
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
