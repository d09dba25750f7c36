"""A sweep folder as one pandas table: one row per cell, finished or not.

``load_results(SWEEP_DIR)`` reads every ``cells/*/config.yaml`` with the cell's ``status.json`` /
``result.json`` / ``error.json`` into one row per cell: every config key flattened
(``proxy.threshold``), every final metric (``test/acc``, ``explain/ad``), ``state``, paths, and the id of
the paired baseline (``baseline_id``: :func:`proxyattention.identity.baseline_of` → ``cell_id``).
TensorBoard scalars are read here too, to check them against ``result.json``. Nothing here imports
torch; only the TensorBoard readers import tensorboard.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import yaml

from launcher.cellstate import (
    STATUS,
    CellState,
    error_headline,
    folder_problem,
    is_cell_id,
    pruned_note,
    read_pruned,
    read_status,
    result_content_problem,
    result_problem,
)
from launcher.fileio import CONFIG, ERROR, RESULT, read_json
from proxyattention.paths import CHECKPOINT, TB_DIR
from launcher.results import SweepFolderError, load_cells
from proxyattention import identity
from proxyattention.config import GROUP_SCHEMAS

PROXY_PARAMS = ("proxy.schedule", "proxy.threshold", "proxy.weight", "proxy.subset", "proxy.mode",
                "proxy.target", "proxy.clear_every_step", "method.name")
# Metric → True when higher is better (the explainability metrics' directions are in explain.py).
METRIC_DIRECTIONS = {"test/acc": True, "val/acc_best": True, "explain/ad": False, "explain/ai": True,
                     "explain/ag": True, "explain/insertion": True, "explain/deletion": False,
                     "explain/pointing": True}
EXPLAIN_METRICS = ("explain/ad", "explain/ai", "explain/ag", "explain/insertion", "explain/deletion",
                   "explain/pointing")
MIN_SEEDS = 3

# A line naming a raised exception: ``ValueError: …``, ``torch.OutOfMemoryError: …``, ``KeyboardInterrupt``.

try:
    _YAML_LOADER: Any = yaml.CSafeLoader
except AttributeError:  # PyYAML built without libyaml
    _YAML_LOADER = yaml.SafeLoader


class ResultsError(RuntimeError):
    """A sweep folder that cannot be read; the message names the path."""


def ids_for(full: dict[str, dict[str, Any]]) -> tuple[str, str, Optional[str]]:
    """(cell id, configuration id (the cell id without the seed), paired baseline id or None)."""
    return identity.ids(full)


# ---------------------------------------------------------------------------------------- loading

def _plans(sweep: Path) -> dict[str, dict]:
    """Cell id → its record in the launcher's ``plans/*.json`` (overrides, role), where there are plans."""
    out: dict[str, dict] = {}
    plan_dir = sweep / "plans"
    if not plan_dir.is_dir():
        return out
    for path in sorted(plan_dir.glob("*.json")):
        cells = (read_json(path) or {}).get("cells", [])
        for c in cells if isinstance(cells, list) else []:
            if isinstance(c, dict) and "id" in c:
                if not is_cell_id(c["id"]):  # never a path: a crafted id could name any folder
                    raise ResultsError(f"{path}: {str(c['id'])[:60]!r} is not a cell id (12 hex digits); the "
                                       "plan file is damaged or crafted: remove it")
                out.setdefault(c["id"], c)
    return out


def _state(has_status: bool, status: Any, done: bool, error: Optional[dict], pruned: bool = False) -> str:
    """The cell's state: its ``status.json``'s as :func:`launcher.cellstate.read_status` judges it
    (DAMAGED when it cannot be trusted), else what its result or error files say."""
    if has_status or status.state == CellState.DAMAGED:
        return status.state.value
    if done:
        return CellState.DONE.value  # a cell run by hand (python -m proxyattention.cell), no launcher status
    if pruned:
        return CellState.PRUNED.value  # stopped at a prune request, no launcher status
    if error is not None:
        return CellState.FAILED.value
    return CellState.PENDING.value


def _precision_of_run(run: dict) -> Optional[str]:
    """The precision an older result (no ``device`` block) recorded as ``run.amp``: the autocast dtype, or
    null for fp32; None where it recorded nothing."""
    if "amp" not in run:
        return None
    return {None: "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(run["amp"])


def _result_columns(cell: Path, result: dict) -> dict[str, Any]:
    """The columns a finished ``result.json`` gives: metrics, ``timing/*``, run and data facts."""
    row: dict[str, Any] = dict(result.get("metrics") or {})
    row.update({f"timing/{k}": v for k, v in (result.get("timing") or {}).items()})
    run = result.get("run") or {}
    row["run.target_layer"] = run.get("target_layer")
    row["run.epochs"] = run.get("epochs")
    row["run.steps"] = run.get("steps")  # gradient steps (absent in older results)
    row["run.device"] = run.get("device")
    device = result.get("device") or {}  # older results: only run.device and run.batch_size
    row["device.type"] = device.get("type") or str(run.get("device") or "").split(":")[0] or None
    row["device.name"] = device.get("name")
    row["device.precision"] = device.get("precision") or _precision_of_run(run)
    row["device.batch_size"] = device.get("batch_size", run.get("batch_size"))
    row["data.split"] = (result.get("data") or {}).get("split")
    row["result_path"] = str(cell / RESULT)
    return row


def _cell_row(cell: Path, now: float) -> dict[str, Any]:
    """The state, error, result and path columns of one cell folder. An entry that cannot be trusted
    (see :func:`launcher.cellstate.read_status`: a status that is not JSON, has an unknown state or
    wrong types, or a DONE whose result is missing, truncated or malformed) is DAMAGED, the reason in
    ``problem``."""
    has_status = os.path.lexists(cell / STATUS)
    status = read_status(cell)
    result = read_json(cell / RESULT)
    error = read_json(cell / ERROR)
    done = result is not None and result_content_problem(result) is None
    # A pruned trial's partial result (``"status": "pruned"``) is never read as a result: no metric columns.
    pruned = None if done else read_pruned(cell)
    state = _state(has_status, status, done, error, pruned is not None)
    if state == CellState.DONE.value and not done:  # the status trusted a result that this read cannot
        state = CellState.DAMAGED.value
        status.error = f"{STATUS} says DONE but {result_problem(cell) or RESULT + ' is not a finished result'}"
    row: dict[str, Any] = {"state": state, "dir": str(cell)}
    if has_status:
        row["attempts"] = status.attempts
        row["duration_s"] = status.duration_s
        hb = status.heartbeat
        row["heartbeat_age_s"] = (now - hb) if (state == CellState.RUNNING.value and hb) else np.nan
    if status.error:
        row["error"] = error_headline(status.error)
    if "error" not in row and error is not None and state != CellState.DONE.value:
        row["error"] = error_headline(f"{error.get('type', 'Error')}: {error.get('error', '')}")
    if state == CellState.PRUNED.value and pruned is not None:
        row.setdefault("error", pruned_note(pruned))
        epoch = (pruned.get("pruned") or {}).get("epoch")
        row["pruned_epoch"] = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else np.nan
    row["problem"] = f"DAMAGED: {error_headline(status.error)}" if state == CellState.DAMAGED.value else ""
    if done:
        row.update(_result_columns(cell, result))
    row["tb_dir"] = str(cell / TB_DIR) if (cell / TB_DIR).is_dir() else None
    row["checkpoint"] = str(cell / CHECKPOINT) if (cell / CHECKPOINT).is_file() else None
    return row


def _snapshot(cfg_path: Path) -> dict:
    """The config groups of a cell's ``config.yaml``; :class:`ResultsError` when it is not a config."""
    try:
        with open(cfg_path, "rb") as f:
            snapshot = yaml.load(f, Loader=_YAML_LOADER) or {}
    except yaml.YAMLError as e:
        raise ResultsError(f"{cfg_path} is not valid YAML ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise ResultsError(f"{cfg_path} cannot be read ({e.strerror or e})") from None
    if not isinstance(snapshot, dict) or not all(isinstance(snapshot.get(g, {}), dict) for g in GROUP_SCHEMAS):
        raise ResultsError(f"{cfg_path} is not a trial config")
    return {k: v for k, v in snapshot.items() if k in GROUP_SCHEMAS}


def _bare_row(name: str, cell: Path, plan: Optional[dict], state: str, problem: str) -> dict[str, Any]:
    """The row of a cell whose config cannot be read (its folder is gone from the store, or its entry is
    damaged): listed with its problem, never dropped; what the plan knows of it is kept."""
    plan = plan or {}
    role = plan.get("role")
    return {"cell_id": name, "state": state, "dir": str(cell), "problem": problem,
            "role": role if role in ("proxy", "baseline") else None, "config_id": None,
            "baseline_id": plan.get("baseline"), "overrides": " ".join(map(str, plan.get("overrides", [])))}


def _add_problem(row: dict[str, Any], problem: str) -> None:
    row["problem"] = (row["problem"] + "; " if row["problem"] else "") + problem


def _add_identity(row: dict[str, Any], full: dict, ids: tuple[str, str, Optional[str]],
                  plan: Optional[dict]) -> None:
    """Ids, role and every config key (``group.key``) of one row; a mismatch is noted as a problem."""
    cid, config_id, base = ids
    if cid != row["cell_id"]:
        _add_problem(row, f"folder name differs from the config's cell id {cid}")
    planned = (plan or {}).get("baseline")
    if planned and base and planned != base:
        _add_problem(row, f"the launcher paired it with {planned}, baseline_of gives {base}")
    row["config_id"] = config_id
    row["role"] = "baseline" if base is None else "proxy"
    row["baseline_id"] = base
    for group, sect in full.items():
        for k, v in sect.items():
            if k != "cache_dir":
                row[f"{group}.{k}"] = v


TRIAL_ROLES = ("proxy", "baseline")


def _is_job_cell(cell: Path, plan: Optional[dict]) -> bool:
    """Whether the cell is another app's job (:mod:`launcher.taskcell`), not a trial: its plan gives it
    another role (``job``), or, planned by no plan, it holds a pickled job or its return."""
    if plan is not None:
        return plan.get("role", "proxy") not in TRIAL_ROLES
    from launcher.taskcell import JOB, JOB_RETURN  # here: it imports hydra

    return os.path.lexists(cell / JOB) or os.path.lexists(cell / JOB_RETURN)


def _job_rows(sweep: Path, ids: set[str]) -> list[dict[str, Any]]:
    """The rows of another app's cells, as :func:`launcher.results.load_cells` reads them (config keys
    flattened, ``return_value``), with this table's identity columns empty."""
    try:
        df = load_cells(sweep, ids)
    except SweepFolderError as e:
        raise ResultsError(str(e)) from None
    rows = df.to_dict(orient="records")
    for row in rows:
        row.update({"config_id": None, "baseline_id": None,
                    "problem": f"DAMAGED: {row['error']}" if row["state"] == CellState.DAMAGED.value else ""})
        if row["role"] in TRIAL_ROLES + ("unknown",):
            row["role"] = "job"
    return rows


def load_results(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per cell of ``SWEEP_DIR/cells/*`` (any folder holding ``config.yaml``), finished or not.

    Columns: ``cell_id`` (the folder name), ``state`` (PENDING … CANCELLED), ``role`` (proxy/baseline),
    ``config_id`` (the configuration without its seed: the seeds of one configuration share it),
    ``baseline_id`` and ``baseline_state`` (proxy cells), every config key as ``group.key``, every metric
    of ``result.json`` (``test/acc``, ``explain/ad``, …), ``timing/*``, ``error``, ``problem``,
    ``overrides`` (from the launcher's plans) and paths (``dir``, ``result_path``, ``tb_dir``,
    ``checkpoint``).

    Cells of another Hydra app's sweep (role ``job`` in the plans: :mod:`launcher.taskcell`) are rows as
    :func:`launcher.results.load_cells` reads them: every config key flattened (``a.b.c``), the job's
    numeric ``return_value``, its other metrics, ``state``, ``error``, ``overrides`` and ``dir``, with
    ``config_id`` and ``baseline_id`` empty.
    """
    sweep = Path(sweep_dir)
    root = sweep / "cells"
    if not root.is_dir():
        raise ResultsError(f"{sweep} has no cells/ folder; pass the sweep folder (the one holding cells/)")
    now = time.time()
    plans = _plans(sweep)
    snapshots, rows, bare = [], [], []
    jobs: set[str] = set()
    for name in sorted(set(os.listdir(root)) | set(plans)):
        cell = root / name
        if is_cell_id(name) and _is_job_cell(cell, plans.get(name)):
            jobs.add(name)
            continue
        if not (cell / CONFIG).is_file():
            # A planned cell (or a link or folder named like one) without its config: gone from the
            # store, or damaged. Listed as a problem; a re-issue of the sweep makes and runs it again.
            if name in plans or (is_cell_id(name) and (os.path.islink(cell) or cell.is_dir())):
                why = folder_problem(cell) or f"its {CONFIG} is missing; re-issue the sweep to run it again"
                bare.append(_bare_row(name, cell, plans.get(name), CellState.PENDING.value, f"missing: {why}"))
            continue
        try:
            snapshot = _snapshot(cell / CONFIG)
        except ResultsError as e:
            bare.append(_bare_row(name, cell, plans.get(name), CellState.DAMAGED.value, f"DAMAGED: {e}"))
            continue
        snapshots.append(snapshot)
        row = {"cell_id": name, **_cell_row(cell, now)}
        plan = plans.get(name)
        row["overrides"] = " ".join(plan.get("overrides", [])) if plan else ""
        rows.append(row)
    job_rows = _job_rows(sweep, jobs) if jobs else []
    if not rows and not bare and not job_rows:
        return pd.DataFrame(columns=["cell_id", "state", "role", "config_id", "baseline_id", "dir"])
    fulls = [identity.complete(s) for s in snapshots]
    ids = [identity.ids(f) for f in fulls]
    for row, full, cell_ids in zip(rows, fulls, ids):
        _add_identity(row, full, cell_ids, plans.get(row["cell_id"]))
    df = pd.DataFrame(rows + bare + job_rows)
    # Pair by the config's id; folders are normally named by it (the launcher does).
    by_id = {cid: row["state"] for (cid, _, _), row in zip(ids, rows)}
    for row in bare:
        by_id.setdefault(row["cell_id"], row["state"])
    df["baseline_state"] = [by_id.get(b, "MISSING") if isinstance(b, str) else None
                            for b in df["baseline_id"]]
    df["_key"] = [i[0] for i in ids] + [row["cell_id"] for row in bare + job_rows]
    return df


def results_csv_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The table as written to ``results.csv``: identity and state first, then config, metrics, paths."""
    if df.empty:
        return df
    first = ["cell_id", "state", "role", "config_id", "baseline_id", "baseline_state"]
    cfg_cols = sorted(c for c in df.columns if "." in c and c.split(".")[0] in GROUP_SCHEMAS)
    metric_cols = sorted(c for c in df.columns if "/" in c and not c.startswith("timing/"))
    timing = sorted(c for c in df.columns if c.startswith("timing/"))
    tail = ["attempts", "duration_s", "error", "problem", "overrides", "run.target_layer", "run.epochs",
            "run.device", "data.split", "dir", "result_path", "tb_dir", "checkpoint"]
    ordered = [c for c in first + cfg_cols + metric_cols + timing + tail if c in df.columns]
    rest = [c for c in df.columns if c not in ordered and not c.startswith("_")]
    return df[ordered + rest]


# ------------------------------------------------------------------------------------------ labels

def varying_keys(rows: pd.DataFrame, prefixes: Optional[tuple[str, ...]] = None) -> list[str]:
    """Config keys (``group.key``) whose values differ between ``rows``, seed excluded.

    A key whose values split the rows exactly as an earlier key does (``dataset.source`` beside
    ``dataset.name``) adds nothing to a label and is left out.
    """
    keys, partitions = [], set()
    for col in sorted(rows.columns):
        if "." not in col or col == "train.seed" or col.split(".")[0] not in GROUP_SCHEMAS:
            continue
        if prefixes is not None and not col.startswith(prefixes):
            continue
        codes = tuple(pd.factorize(rows[col].astype(str))[0])
        if max(codes, default=0) < 1 or codes in partitions:
            continue
        partitions.add(codes)
        keys.append(col)
    return keys


def float_digits(values: pd.Series) -> int:
    """The fewest significant digits, at least 3, that keep ``values``' distinct floats distinct."""
    floats = {float(v) for v in values.dropna() if isinstance(v, float)}
    for d in range(3, 18):
        if len({f"{v:.{d}g}" for v in floats}) == len(floats):
            return d
    return 17


def fmt_param(v: Any, digits: int = 3) -> str:
    """A config value for a label or a table: a float with ``digits`` significant digits (``0.164``; an
    integral float keeps its ``.0``), anything else as it is."""
    if isinstance(v, (float, np.floating)) and not isinstance(v, bool):
        v = float(v)
        if math.isfinite(v) and v == int(v) and abs(v) < 1e15:
            return repr(v)
        return f"{v:.{digits}g}"
    return str(v)


def config_labels(df: pd.DataFrame, always: Sequence[str] = ()) -> dict[str, str]:
    """config_id → a short label of the keys that vary across the sweep (``proxy.threshold=0.4 …``).

    Shared keys (dataset, model, train) vary across all cells; proxy and method keys across the proxy
    cells. Baselines read ``baseline`` plus their shared keys. ``always`` (a search's searched keys) are
    in every label even where another key splits the cells the same way. Floats are rounded to 3
    significant digits, more only where 3 would make two different values of a key read the same.
    """
    shared_groups = tuple(f"{g}." for g in GROUP_SCHEMAS if g not in ("proxy", "method"))
    forced = [k for k in always if k in df.columns]
    shared = varying_keys(df, shared_groups)
    shared += [k for k in forced if k.startswith(shared_groups) and k not in shared]
    proxy_rows = df[df["role"] == "proxy"]
    own = [k for k in varying_keys(proxy_rows, ("proxy.", "method.")) if k != "proxy.enabled"]
    own += [k for k in forced if not k.startswith(shared_groups) and k not in own]
    shared, own = sorted(shared), sorted(own)
    digits = {**{k: float_digits(df[k]) for k in shared}, **{k: float_digits(proxy_rows[k]) for k in own}}

    def part(k: str, v: Any) -> str:
        return f"{k[:-5] if k in ('dataset.name', 'model.name') else k}={fmt_param(v, digits[k])}"

    labels = {}
    for config_id, g in df.groupby("config_id", sort=False):
        r = g.iloc[0]
        parts = [part(k, r[k]) for k in shared]
        if r["role"] == "baseline":
            labels[config_id] = " ".join(["baseline", *parts])
        else:
            labels[config_id] = " ".join(parts + [part(k, r[k]) for k in own]) or "proxy"
    return labels


# ------------------------------------------------------------------------------------- TensorBoard

def read_scalars(tb_dir: str | Path) -> pd.DataFrame:
    """Every scalar in a TensorBoard folder (not its sub-folders) as rows (tag, step, value).

    Read with tensorboard's EventAccumulator; where a step was logged twice (a resumed trial), the last
    value counts.
    """
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    acc = EventAccumulator(str(tb_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    rows = [(tag, ev.step, ev.value) for tag in acc.Tags().get("scalars", []) for ev in acc.Scalars(tag)]
    df = pd.DataFrame(rows, columns=["tag", "step", "value"])
    return df.drop_duplicates(["tag", "step"], keep="last").reset_index(drop=True)


def _same(a: float, b: float, rel_tol: float) -> bool:
    """Equal up to ``rel_tol`` (TensorBoard stores float32), NaN equal to NaN."""
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b))


def check_tensorboard(cell_dir: str | Path, rel_tol: float = 1e-5) -> list[str]:
    """Disagreements between a DONE cell's TensorBoard scalars and its ``result.json`` ([] = agree).

    Checks every per-epoch value of ``history`` and every final metric TensorBoard holds at the last
    epoch (``test/*``, ``explain/*``).
    """
    cell = Path(cell_dir)
    result = read_json(cell / RESULT)
    if result is None:
        return [f"{cell}: no result.json"]
    if not (cell / TB_DIR).is_dir():
        return [f"{cell}: no tb/ folder"]
    tb = read_scalars(cell / TB_DIR)
    values = {(t, int(s)): v for t, s, v in tb.itertuples(index=False)}
    problems = []
    for h in result.get("history", []):
        for key, v in h.items():
            if key == "epoch":
                continue
            got = values.get((key, int(h["epoch"])))
            if got is None:
                problems.append(f"{key} at epoch {h['epoch']}: missing in TensorBoard")
            elif not _same(float(got), float(v), rel_tol):
                problems.append(f"{key} at epoch {h['epoch']}: TensorBoard {got} vs result.json {v}")
    last = max((int(h["epoch"]) for h in result.get("history", [])), default=0)
    metrics = result.get("metrics") or {}
    for key, v in metrics.items():
        if not key.startswith(("test/", "explain/")):  # the others are totals or per-epoch in TensorBoard
            continue
        got = values.get((key, last))
        if got is not None and not _same(float(got), float(v), rel_tol):
            problems.append(f"{key}: TensorBoard {got} vs result.json {v}")
    for key in ("test/acc", "test/loss"):
        if key in metrics and (key, last) not in values:
            problems.append(f"{key}: missing in TensorBoard")
    return problems
