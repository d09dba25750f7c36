"""``python -m launcher.results SWEEP_DIR [--csv FILE] [--json]`` — any app's sweep as one table.

:func:`load_cells` reads a sweep folder into a pandas table with one row per cell, whatever app ran it:
each cell of ``SWEEP_DIR/cells/*`` and each cell a plan (``plans/*.json``) names, finished or not. Its
columns:

- ``cell_id``, ``state`` (as :mod:`launcher.status` shows it: :func:`launcher.cellstate.read_status`,
  so an entry that cannot be trusted is DAMAGED, and a RUNNING cell whose launcher is gone is CANCELLED
  or orphaned as :func:`launcher.cellstate.effective_status` says), ``role`` (from the plans: ``job`` for
  a Hydra app's task function, ``unknown`` for a cell no plan names);
- every key of the cell's ``config.yaml``, nested keys flattened as ``a.b.c``; a list stays one value
  (``tags`` → ``['a', 'b']``), as the Proxy Attention results table keeps them. A key that would take
  the name of one of this table's own columns gets a ``config.`` prefix;
- ``return_value``: the job's return value when it returned a finite number (``result.json``'s
  ``metrics.return_value``), else NaN. Any other return (None, a string, a dict, an object) is only in
  the cell's ``jobreturn.pkl``, which this table never opens: unpickling runs code from the store and
  needs the app's own classes. Read it where you trust the store:
  ``pickle.load(open(Path(dir) / "jobreturn.pkl", "rb")).return_value``;
- every other metric of a DONE cell's ``result.json`` (``metric.`` prefixed where the name is taken);
- ``error``: one line, the exception a FAILED cell raised (``ValueError: x=2 is refused``) or why a
  cell is DAMAGED, missing or cancelled; empty otherwise;
- ``overrides``: the job's overrides from the plans, space-separated; ``dir``: the cell folder.

Rows come in the plans' order (the order of the jobs), then cells no plan names. Nothing here imports
this project's trial code, torch or Hydra; pandas is imported when a table is built.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

from launcher import cellstate, manifest
from launcher.cellstate import CellState
from launcher.fileio import CONFIG, ERROR, RESULT, read_json

if TYPE_CHECKING:
    import pandas as pd

FIXED = ("cell_id", "state", "role")
RETURN = "return_value"
TAIL = ("error", "overrides", "dir")
RESERVED = frozenset(FIXED + (RETURN,) + TAIL)


class SweepFolderError(ValueError):
    """A folder that cannot be read as a sweep (no ``cells/``, a damaged plan file); the message names it."""


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": {"c": 1}}, "tags": [1, 2]}`` → ``{"a.b.c": 1, "tags": [1, 2]}``: mappings are
    flattened, lists and every other value kept as they are (an empty mapping too)."""
    if not isinstance(config, dict) or (prefix and not config):
        return {prefix: config}
    out: dict[str, Any] = {}
    for k, v in config.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _read_config(cell: Path) -> tuple[Optional[dict], str]:
    """The cell's ``config.yaml`` as a mapping, or (None, why not) — never an exception."""
    import yaml

    path = cell / CONFIG
    try:
        with open(path, "rb") as f:
            loaded = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except FileNotFoundError:
        return None, ("" if not os.path.isdir(cell) else f"its {CONFIG} is missing")
    except NotADirectoryError:
        return None, ""
    except OSError as e:
        return None, f"{CONFIG} cannot be read ({e.strerror or e})"
    except yaml.YAMLError as e:
        return None, f"{CONFIG} is not valid YAML ({str(e).splitlines()[0]})"
    if loaded is None:
        return {}, ""
    if not isinstance(loaded, dict):
        return None, f"{CONFIG} holds {type(loaded).__name__}, not a mapping"
    return loaded, ""


def _number(v: Any) -> float:
    """A metric as a float: NaN for None and anything that is not a number."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    return float(v)


def _cell(cell: Path, record: manifest.CellRecord, metric_names: dict[str, None]) -> dict[str, Any]:
    """The row of one cell: state and error, flattened config, return value and metrics, plan facts; the
    metrics' column names are added to ``metric_names``."""
    has_status = os.path.lexists(cell / cellstate.STATUS)
    status = cellstate.effective_status(cellstate.read_status(cell), cell=cell)
    state = status.state
    by_hand = not has_status and state == CellState.PENDING  # no launcher status: judged by its files
    result = cellstate.read_result(cell) if state == CellState.DONE or by_hand else None
    if state == CellState.DONE and result is None:  # the size matches, the content is no finished result
        state = CellState.DAMAGED
        why = cellstate.result_problem(cell) or f"{RESULT} is not a finished result"
        status.error = f"{cellstate.STATUS} says DONE but {why}"
    pruned = None
    if by_hand:
        pruned = None if result is not None else cellstate.read_pruned(cell)
        if result is not None:
            state = CellState.DONE
        elif pruned is not None:
            state = CellState.PRUNED
        elif os.path.lexists(cell / ERROR):
            state = CellState.FAILED
    error = cellstate.error_headline(status.error)
    err_file = read_json(cell / ERROR) if state != CellState.DONE else None
    if not error and err_file is not None:
        error = cellstate.error_headline(f"{err_file.get('type', 'Error')}: {err_file.get('error', '')}")
    if not error and pruned is not None:
        error = cellstate.pruned_note(pruned)
    config, problem = _read_config(cell)
    if problem and state in (CellState.PENDING, CellState.DONE) and os.path.isdir(cell) \
            and os.path.lexists(cell / CONFIG):  # a config that cannot be read: the entry is damaged
        state = CellState.DAMAGED
    if problem and not error:
        error = problem
    row: dict[str, Any] = {"cell_id": record.id, "state": state.value, "role": record.role}
    for k, v in flatten(config or {}).items():
        row[f"config.{k}" if k in RESERVED else k] = v
    metrics = dict((result or {}).get("metrics") or {}) if state == CellState.DONE else {}
    row[RETURN] = _number(metrics.pop(RETURN, None))
    for k, v in metrics.items():
        name = f"metric.{k}" if (k in RESERVED or k in row) else k
        row[name] = _number(v)
        metric_names[name] = None
    row.update({"error": error, "overrides": " ".join(record.overrides), "dir": str(cell)})
    return row


def _ordered(rows: list[dict[str, Any]], metric_names: dict[str, None]) -> list[str]:
    """The columns: identity and state, config keys (first seen first), return value, metrics, the rest."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    config = [c for c in seen if c not in RESERVED and c not in metric_names]
    return [*FIXED, *config, RETURN, *metric_names, *TAIL]


def load_cells(sweep_dir: str | Path, ids: Optional[Iterable[str]] = None) -> "pd.DataFrame":
    """One row per cell of ``SWEEP_DIR`` (see the module's text for the columns); with ``ids``, only
    those cells. Raises :class:`SweepFolderError` when the folder has no ``cells/`` or a plan file names
    something other than a cell id."""
    import pandas as pd

    sweep = Path(sweep_dir)
    root = cellstate.cells_root(sweep)
    if not root.is_dir():
        raise SweepFolderError(f"{sweep} has no cells/ folder: it is not a sweep folder (pass the folder "
                               "holding cells/, printed at the end of every launch)")
    try:
        records = manifest.read_plans(sweep)
    except manifest.PlanFileError as e:
        raise SweepFolderError(str(e)) from None
    wanted = None if ids is None else set(ids)
    metric_names: dict[str, None] = {}
    rows = [_cell(root / r.id, r, metric_names) for r in records if wanted is None or r.id in wanted]
    df = pd.DataFrame(rows, columns=_ordered(rows, metric_names))
    df[RETURN] = df[RETURN].astype(float)
    return df


# ---------------------------------------------------------------------------------------------------
# The command


def _plain(v: Any) -> Any:
    """A cell of the table as JSON holds it: NaN → null, numpy scalars → Python numbers."""
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launcher.results",
                                 description="Print every cell of a sweep folder as one table: config keys, "
                                             "return value, metrics, state and error (any Hydra app).")
    ap.add_argument("sweep_dir", type=Path, help="the sweep folder (the one holding cells/)")
    ap.add_argument("--csv", metavar="FILE", help="also write the table as CSV to FILE ('-': to stdout, "
                                                  "instead of the printed table)")
    ap.add_argument("--json", action="store_true", help="print the rows as a JSON list instead")
    args = ap.parse_args(argv)
    try:
        df = load_cells(args.sweep_dir)
    except SweepFolderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.csv == "-":
        df.to_csv(sys.stdout, index=False)
    elif args.csv:
        try:
            df.to_csv(args.csv, index=False)
        except OSError as e:
            print(f"error: cannot write {args.csv} ({e.strerror or e})", file=sys.stderr)
            return 2
    if args.json:
        rows = [{k: _plain(v) for k, v in row.items()} for row in df.to_dict(orient="records")]
        sys.stdout.write(json.dumps(rows, default=str) + "\n")
    elif args.csv != "-":
        if df.empty:
            print(f"{args.sweep_dir}: no cells yet")
        else:
            import pandas as pd

            with pd.option_context("display.max_rows", None, "display.max_columns", None,
                                   "display.width", 10_000, "display.max_colwidth", None):
                print(df.fillna({"error": ""}).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
