"""What a sweep returns to Hydra for each job: the cell's objective, for adaptive sweepers (Optuna).

``hydra.launcher.objective`` names a validation metric of the trial's ``result.json`` (default
``val/acc_best``). A test metric is refused: a sweeper that selects on the test split reports a test
score it has tuned to. With ``hydra.launcher.objective_vs_baseline=true`` the value is the paired gain
``proxy − baseline`` of that metric (its shared paired baseline ran the same seed and epochs without
proxy steps), which is what Proxy Attention is meant to raise; a baseline job's gain is 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from proxyattention import cellstate

DEFAULT = "val/acc_best"
ALLOWED_PREFIXES = ("val/",)


def check_objective(name: str) -> None:
    """Raise ``ValueError`` naming ``hydra.launcher.objective`` if it is not a validation metric."""
    if not isinstance(name, str) or not name.startswith(ALLOWED_PREFIXES):
        raise ValueError(f"hydra.launcher.objective={name!r} must be a validation metric such as {DEFAULT} "
                         "(a sweeper selecting on the test split would report a tuned test score)")


def value(cell: Path, name: str = DEFAULT, baseline: Optional[Path] = None) -> Optional[float]:
    """The cell's ``name`` metric, minus its baseline's when ``baseline`` is given; None if missing."""
    mine = _metric(cell, name)
    if mine is None or baseline is None:
        return mine
    base = _metric(baseline, name)
    return None if base is None else mine - base


def _metric(cell: Path, name: str) -> Optional[float]:
    result = cellstate.read_result(cell) or {}
    v = (result.get("metrics") or {}).get(name)
    return None if v is None else float(v)
