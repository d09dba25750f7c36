"""A sweep folder as one pandas table, paired proxy − baseline statistics, and the report's tables.

``load_results(SWEEP_DIR)`` reads every ``cells/*/config.yaml`` (finished or not) with the cell's
``status.json`` / ``result.json`` / ``error.json`` into one row per cell: every config key flattened
(``proxy.threshold``), every final metric (``test/acc``, ``explain/ad``), ``state``, paths, and the id of
the paired baseline (``baseline_id``: :func:`proxyattention.config.baseline_of` → ``cell_id``).

Statistics are paired: a proxy cell is compared with the baseline of the same seed (same split, initial
weights, data order and epochs), and a 95% Student-t interval is given over seeds. Nothing here imports
torch; only the TensorBoard check imports tensorboard.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import yaml

from proxyattention import identity
from proxyattention.config import GROUP_SCHEMAS
from proxyattention.schedule import parse_schedule
from proxyattention.fileio import read_json

log = logging.getLogger(__name__)

STATES = ("PENDING", "RUNNING", "DONE", "FAILED", "TIMEOUT", "CANCELLED")
PROXY_PARAMS = ("proxy.schedule", "proxy.threshold", "proxy.weight", "proxy.subset", "proxy.mode",
                "proxy.target", "proxy.clear_every_step", "method.name")
# Metric → True when higher is better (the explainability metrics' directions are in explain.py).
METRIC_DIRECTIONS = {"test/acc": True, "val/acc_best": True, "explain/ad": False, "explain/ai": True,
                     "explain/ag": True, "explain/insertion": True, "explain/deletion": False,
                     "explain/pointing": True}
EXPLAIN_METRICS = ("explain/ad", "explain/ai", "explain/ag", "explain/insertion", "explain/deletion",
                   "explain/pointing")
MIN_SEEDS = 3

try:
    _YAML_LOADER: Any = yaml.CSafeLoader
except AttributeError:  # PyYAML built without libyaml
    _YAML_LOADER = yaml.SafeLoader


class ResultsError(RuntimeError):
    """A sweep folder that cannot be read; the message names the path."""


# ------------------------------------------------------------------------------------ cell identity

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
        for c in (read_json(path) or {}).get("cells", []):
            if isinstance(c, dict) and "id" in c:
                out.setdefault(c["id"], c)
    return out


def _first_line(text: Optional[str], limit: int = 160) -> str:
    if not text:
        return ""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _cell_row(cell: Path, snapshot: dict, now: float) -> dict[str, Any]:
    status = read_json(cell / "status.json")
    result = read_json(cell / "result.json")
    error = read_json(cell / "error.json")
    done = result is not None and result.get("status") == "done"
    if status is not None:
        state = str(status.get("state", "PENDING"))
    elif done:
        state = "DONE"  # a cell run by hand (python -m proxyattention.cell), no launcher status
    elif error is not None:
        state = "FAILED"
    else:
        state = "PENDING"
    row: dict[str, Any] = {"state": state, "dir": str(cell)}
    problem = ""
    if state == "DONE" and not done:
        problem = "status DONE but result.json is missing or unfinished"
    if status is not None:
        row["attempts"] = status.get("attempts")
        row["duration_s"] = status.get("duration_s")
        hb = status.get("heartbeat")
        row["heartbeat_age_s"] = (now - hb) if (state == "RUNNING" and hb) else np.nan
        if status.get("error"):
            row["error"] = _first_line(status.get("error"))
    if "error" not in row and error is not None and state != "DONE":
        row["error"] = _first_line(f"{error.get('type', 'Error')}: {error.get('error', '')}")
    row["problem"] = problem
    if done:
        for k, v in (result.get("metrics") or {}).items():
            row[k] = v
        for k, v in (result.get("timing") or {}).items():
            row[f"timing/{k}"] = v
        run = result.get("run") or {}
        row["run.target_layer"] = run.get("target_layer")
        row["run.epochs"] = run.get("epochs")
        row["run.device"] = run.get("device")
        row["data.split"] = (result.get("data") or {}).get("split")
        row["result_path"] = str(cell / "result.json")
    row["tb_dir"] = str(cell / "tb") if (cell / "tb").is_dir() else None
    row["checkpoint"] = str(cell / "checkpoint.pt") if (cell / "checkpoint.pt").is_file() else None
    return row


def load_results(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per cell of ``SWEEP_DIR/cells/*`` (any folder holding ``config.yaml``), finished or not.

    Columns: ``cell_id`` (the folder name), ``state`` (PENDING … CANCELLED), ``role`` (proxy/baseline),
    ``config_id`` (the configuration without its seed: the seeds of one configuration share it),
    ``baseline_id`` and ``baseline_state`` (proxy cells), every config key as ``group.key``, every metric
    of ``result.json`` (``test/acc``, ``explain/ad``, …), ``timing/*``, ``error``, ``problem``,
    ``overrides`` (from the launcher's plans) and paths (``dir``, ``result_path``, ``tb_dir``,
    ``checkpoint``).
    """
    sweep = Path(sweep_dir)
    root = sweep / "cells"
    if not root.is_dir():
        raise ResultsError(f"{sweep} has no cells/ folder; pass the sweep folder (the one holding cells/)")
    now = time.time()
    plans = _plans(sweep)
    snapshots, rows = [], []
    for name in sorted(os.listdir(root)):
        cell = root / name
        cfg_path = cell / "config.yaml"
        if not cfg_path.is_file():
            continue
        try:
            with open(cfg_path, "rb") as f:
                snapshot = yaml.load(f, Loader=_YAML_LOADER) or {}
        except yaml.YAMLError as e:
            raise ResultsError(f"{cfg_path} is not valid YAML ({e}); fix or remove that cell folder") from None
        snapshot = {k: v for k, v in snapshot.items() if k in GROUP_SCHEMAS}
        snapshots.append(snapshot)
        row = {"cell_id": name, **_cell_row(cell, snapshot, now)}
        plan = plans.get(name)
        row["overrides"] = " ".join(plan.get("overrides", [])) if plan else ""
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=["cell_id", "state", "role", "config_id", "baseline_id", "dir"])

    fulls = [identity.complete(s) for s in snapshots]
    ids = [identity.ids(f) for f in fulls]
    for row, full, (cid, config_id, base) in zip(rows, fulls, ids):
        if cid != row["cell_id"]:
            row["problem"] = (row["problem"] + "; " if row["problem"] else "") + \
                f"folder name differs from the config's cell id {cid}"
        planned = (plans.get(row["cell_id"]) or {}).get("baseline")
        if planned and base and planned != base:
            row["problem"] = (row["problem"] + "; " if row["problem"] else "") + \
                f"the launcher paired it with {planned}, baseline_of gives {base}"
        row["config_id"] = config_id
        row["role"] = "baseline" if base is None else "proxy"
        row["baseline_id"] = base
        for group, sect in full.items():
            for k, v in sect.items():
                if k == "cache_dir":
                    continue
                row[f"{group}.{k}"] = v
    df = pd.DataFrame(rows)
    # Pair by the config's id; folders are normally named by it (the launcher does).
    by_id = {cid: state for (cid, _, _), state in zip(ids, df["state"])}
    df["baseline_state"] = [by_id.get(b, "MISSING") if isinstance(b, str) else None
                            for b in df["baseline_id"]]
    df["_key"] = [i[0] for i in ids]
    return df


# ------------------------------------------------------------------------------------- TensorBoard

def read_scalars(tb_dir: str | Path) -> pd.DataFrame:
    """Every scalar in a TensorBoard folder (not its sub-folders) as rows (tag, step, value).

    Read with tensorboard's EventAccumulator; where a step was logged twice (a resumed trial), the last
    value counts.
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    rows = [(tag, ev.step, ev.value) for tag in acc.Tags().get("scalars", []) for ev in acc.Scalars(tag)]
    df = pd.DataFrame(rows, columns=["tag", "step", "value"])
    return df.drop_duplicates(["tag", "step"], keep="last").reset_index(drop=True)


def check_tensorboard(cell_dir: str | Path, rel_tol: float = 1e-5) -> list[str]:
    """Disagreements between a DONE cell's TensorBoard scalars and its ``result.json`` ([] = agree).

    Checks every per-epoch value of ``history`` and every final metric TensorBoard holds at the last
    epoch (``test/*``, ``explain/*``).
    """
    cell = Path(cell_dir)
    result = read_json(cell / "result.json")
    if result is None:
        return [f"{cell}: no result.json"]
    if not (cell / "tb").is_dir():
        return [f"{cell}: no tb/ folder"]
    tb = read_scalars(cell / "tb")
    values = {(t, int(s)): v for t, s, v in tb.itertuples(index=False)}
    problems = []

    def same(a: float, b: float) -> bool:  # TensorBoard stores float32
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b))

    for h in result.get("history", []):
        for key, v in h.items():
            if key == "epoch":
                continue
            got = values.get((key, int(h["epoch"])))
            if got is None:
                problems.append(f"{key} at epoch {h['epoch']}: missing in TensorBoard")
            elif not same(float(got), float(v)):
                problems.append(f"{key} at epoch {h['epoch']}: TensorBoard {got} vs result.json {v}")
    last = max((int(h["epoch"]) for h in result.get("history", [])), default=0)
    for key, v in (result.get("metrics") or {}).items():
        if not key.startswith(("test/", "explain/")):  # the others are totals or per-epoch in TensorBoard
            continue
        got = values.get((key, last))
        if got is not None and not same(float(got), float(v)):
            problems.append(f"{key}: TensorBoard {got} vs result.json {v}")
    for key in ("test/acc", "test/loss"):
        if key in (result.get("metrics") or {}) and (key, last) not in values:
            problems.append(f"{key}: missing in TensorBoard")
    return problems


# -------------------------------------------------------------------------------------- statistics

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t distribution function."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


@lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """Student's t quantile (inverse of :func:`t_cdf`) by bisection; no scipy needed."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass
class Interval:
    """Mean ± std over n values, with a two-sided t interval (NaN bounds when n < 2)."""

    n: int
    mean: float
    std: float
    lo: float
    hi: float

    @property
    def contains_zero(self) -> bool:
        return not (self.lo > 0 or self.hi < 0)  # NaN bounds count as "contains zero"


def mean_interval(values: Iterable[float], level: float = 0.95) -> Interval:
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return Interval(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return Interval(n, mean, std, mean - half, mean + half)


def paired_differences(df: pd.DataFrame, metric: str = "test/acc") -> pd.DataFrame:
    """One row per proxy cell: its metric, its same-seed baseline's, and the difference.

    Columns: cell_id, config_id, train.seed, proxy, baseline (NaN when the baseline is not DONE or
    missing), diff, baseline_id, baseline_state. Proxy cells that are not DONE are left out.
    """
    cols = ["cell_id", "config_id", "train.seed", "proxy", "baseline", "diff", "baseline_id",
            "baseline_state"]
    if df.empty or metric not in df.columns:
        return pd.DataFrame(columns=cols)
    done = df[df["state"] == "DONE"]
    base_values = dict(zip(done.loc[done["role"] == "baseline", "_key"],
                           done.loc[done["role"] == "baseline", metric]))
    proxy = done[done["role"] == "proxy"]
    out = pd.DataFrame({
        "cell_id": proxy["cell_id"], "config_id": proxy["config_id"], "train.seed": proxy["train.seed"],
        "proxy": proxy[metric].astype(float),
        "baseline": [base_values.get(b, math.nan) for b in proxy["baseline_id"]],
        "baseline_id": proxy["baseline_id"], "baseline_state": proxy["baseline_state"],
    })
    out["baseline"] = out["baseline"].astype(float)
    out["diff"] = out["proxy"] - out["baseline"]
    return out[cols].reset_index(drop=True)


def notes_for(interval: Optional[Interval], missing_baselines: int, seeds: int) -> str:
    """The plain-words caveats of one paired number."""
    notes = []
    if missing_baselines:
        notes.append(f"no baseline for {missing_baselines} seed(s)")
    if 0 < seeds < MIN_SEEDS:
        notes.append(f"only {seeds} seed(s) (< {MIN_SEEDS})")
    if interval is not None and interval.n >= 2 and interval.contains_zero:
        notes.append("interval contains 0")
    if interval is not None and interval.n == 0:
        notes.append("no paired result")
    return "; ".join(notes)


def _intervals(groups: Any, level: float) -> pd.DataFrame:
    """n, mean, std and t-interval bounds of each group of a grouped Series (NaN values ignored)."""
    agg = groups.agg(["count", "mean", "std"])
    n = agg["count"].to_numpy()
    q = np.array([t_quantile(0.5 + level / 2, k - 1) if k >= 2 else math.nan for k in n])
    half = q * agg["std"].to_numpy() / np.sqrt(np.maximum(n, 1))
    agg["lo"], agg["hi"] = agg["mean"] - half, agg["mean"] + half
    return agg


def _notes(paired: np.ndarray, missing: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> list[str]:
    return [notes_for(Interval(int(n), math.nan, math.nan, a, b), int(m), int(n))
            for n, m, a, b in zip(paired, missing, lo, hi)]


def paired_summary(df: pd.DataFrame, metric: str = "test/acc", level: float = 0.95) -> pd.DataFrame:
    """One row per proxy configuration (all its seeds): proxy and baseline mean ± std, and the paired
    difference's mean, std and t interval over seeds, with ``note`` saying what weakens the number.
    """
    cols = ["config_id", "seeds", "paired", "proxy_mean", "proxy_std", "baseline_mean", "baseline_std",
            "diff_mean", "diff_std", "ci_lo", "ci_hi", "no_baseline", "few_seeds", "contains_zero", "note"]
    diffs = paired_differences(df, metric)
    if diffs.empty:
        return pd.DataFrame(columns=cols)
    g = diffs.groupby("config_id", sort=False)
    d = _intervals(g["diff"], level)
    # Baseline statistics over the paired seeds only, so both sides describe the same seeds.
    b = diffs.assign(baseline=diffs["baseline"].where(diffs["diff"].notna())).groupby(
        "config_id", sort=False)["baseline"].agg(["mean", "std"])
    p = g["proxy"].agg(["count", "mean", "std"])
    out = pd.DataFrame({
        "config_id": d.index, "seeds": p["count"].to_numpy(), "paired": d["count"].to_numpy(),
        "proxy_mean": p["mean"].to_numpy(), "proxy_std": p["std"].to_numpy(),
        "baseline_mean": b["mean"].to_numpy(), "baseline_std": b["std"].to_numpy(),
        "diff_mean": d["mean"].to_numpy(), "diff_std": d["std"].to_numpy(),
        "ci_lo": d["lo"].to_numpy(), "ci_hi": d["hi"].to_numpy()})
    out["no_baseline"] = out["seeds"] - out["paired"]
    out["few_seeds"] = out["paired"] < MIN_SEEDS
    out["contains_zero"] = ~((out["ci_lo"] > 0) | (out["ci_hi"] < 0))
    out["note"] = _notes(out["paired"], out["no_baseline"], out["ci_lo"], out["ci_hi"])
    return out[cols].reset_index(drop=True)


def grouped_paired(df: pd.DataFrame, by: Sequence[str], metric: str = "test/acc",
                   level: float = 0.95) -> pd.DataFrame:
    """Proxy cells grouped by ``by`` (e.g. dataset, model, threshold): accuracy mean ± std over cells,
    and the paired difference averaged per seed first (configurations of one seed share a baseline, so
    they are not independent), then a t interval over seeds.
    """
    by = list(by)
    diffs = paired_differences(df, metric)
    proxy = df[(df["state"] == "DONE") & (df["role"] == "proxy")]
    if proxy.empty or diffs.empty:
        return pd.DataFrame()
    diffs = diffs.merge(proxy[["cell_id", *[c for c in by if c != "train.seed"]]], on="cell_id", how="left")
    per_seed = diffs.dropna(subset=["diff"]).groupby(by + ["train.seed"], dropna=False)["diff"].mean()
    d = _intervals(per_seed.groupby(level=list(range(len(by))), dropna=False), level)
    g = diffs.groupby(by, dropna=False)
    acc = g["proxy"].agg(["count", "mean", "std"])
    seeds = g["train.seed"].nunique()
    unpaired = diffs[diffs["diff"].isna()].groupby(by, dropna=False)["train.seed"].nunique()
    out = acc.join(d.add_prefix("d_"), how="left")
    out = out.assign(seeds=seeds, missing=unpaired.reindex(out.index).fillna(0).astype(int))
    out["d_count"] = out["d_count"].fillna(0).astype(int)
    res = out.reset_index().rename(columns={"count": "cells", "mean": "acc_mean", "std": "acc_std",
                                            "d_mean": "diff_mean", "d_std": "diff_std", "d_lo": "ci_lo",
                                            "d_hi": "ci_hi", "d_count": "paired_seeds"})
    res["note"] = _notes(res["paired_seeds"], res["missing"], res["ci_lo"], res["ci_hi"])
    return res[[*by, "cells", "seeds", "acc_mean", "acc_std", "diff_mean", "diff_std", "ci_lo", "ci_hi",
                "paired_seeds", "note"]]


def baseline_summary(df: pd.DataFrame, by: Sequence[str], metric: str = "test/acc") -> pd.DataFrame:
    """DONE baseline cells grouped by ``by``: metric mean ± std (n)."""
    base = df[(df["state"] == "DONE") & (df["role"] == "baseline")]
    rows = []
    for key, g in base.groupby(list(by), sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        iv = mean_interval(g[metric].astype(float))
        rows.append({**dict(zip(by, key)), "n": iv.n, "mean": iv.mean, "std": iv.std})
    return pd.DataFrame(rows)


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


def config_labels(df: pd.DataFrame) -> dict[str, str]:
    """config_id → a short label of the keys that vary across the sweep (``proxy.threshold=0.4 …``).

    Shared keys (dataset, model, train) vary across all cells; proxy and method keys across the proxy
    cells. Baselines read ``baseline`` plus their shared keys.
    """
    shared_groups = tuple(f"{g}." for g in GROUP_SCHEMAS if g not in ("proxy", "method"))
    shared = varying_keys(df, shared_groups)
    proxy_rows = df[df["role"] == "proxy"]
    own = [k for k in varying_keys(proxy_rows, ("proxy.", "method.")) if k != "proxy.enabled"]
    labels = {}
    for config_id, g in df.groupby("config_id", sort=False):
        r = g.iloc[0]
        parts = [f"{k[:-5] if k in ('dataset.name', 'model.name') else k}={r[k]}" for k in shared]
        if r["role"] == "baseline":
            labels[config_id] = " ".join(["baseline", *parts])
        else:
            labels[config_id] = " ".join(parts + [f"{k}={r[k]}" for k in own]) or "proxy"
    return labels


# ------------------------------------------------------------------------------------------ tables

def fmt_mean(mean: float, std: float, n: int, digits: int = 3, scale: float = 1.0) -> str:
    """``0.912 ± 0.004 (n=3)``; a single value has no std."""
    if n == 0 or mean is None or math.isnan(mean):
        return "–"
    if n == 1 or std is None or math.isnan(std):
        return f"{mean * scale:.{digits}f} (n=1)"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f} (n={n})"


def fmt_diff(mean: float, lo: float, hi: float, digits: int = 3, scale: float = 1.0) -> str:
    """``+0.012 [−0.004, +0.028]``; without an interval, the mean alone."""
    if mean is None or math.isnan(mean):
        return "–"
    if lo is None or math.isnan(lo):
        return f"{mean * scale:+.{digits}f}"
    return f"{mean * scale:+.{digits}f} [{lo * scale:+.{digits}f}, {hi * scale:+.{digits}f}]"


def markdown_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A GitHub markdown table (``|`` in cells escaped)."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


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
