"""Paired proxy − baseline statistics over seeds, on the table of :mod:`proxyattention.analysis.table`.

A proxy cell is compared with the baseline of the same seed (same split, initial weights, data order
and epochs), and a Student-t interval (95% by default) is given over seeds. Each number carries plain
caveats: a missing baseline, fewer than ``MIN_SEEDS`` seeds, an interval that contains zero, and
differences that are all equal (zero spread: the t statistic is undefined, so there is neither an
interval nor a p-value, only the difference and n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from proxyattention.analysis.table import MIN_SEEDS


def t_cdf(t: float, df: float) -> float:
    """Student's t distribution function."""
    from scipy.stats import t as student_t

    return float(student_t.cdf(t, df))


@lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """Student's t quantile (inverse of :func:`t_cdf`)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    from scipy.stats import t as student_t

    return float(student_t.ppf(p, df))


# Differences whose standard deviation is below this fraction of their size (at least 1) are taken as
# all equal: accuracies are fractions k/N, and differences of the same k/N come out of floating point
# a few ulps apart, which would otherwise give an enormous t and p = 0.
ZERO_SPREAD_RTOL = 1e-9


def zero_spread(n: int, mean: float, std: float) -> bool:
    """Whether ``n`` ≥ 2 values are all equal (up to rounding): the paired t statistic, mean / (std /
    √n), is then undefined (0/0 or ±∞), so there is no t interval and no p-value."""
    return (n >= 2 and std is not None and math.isfinite(std) and mean is not None and math.isfinite(mean)
            and std <= ZERO_SPREAD_RTOL * max(1.0, abs(mean)))


@dataclass
class Interval:
    """Mean ± std over n values, with a two-sided t interval (NaN bounds when n < 2, and when the n
    values are all equal: :attr:`degenerate`)."""

    n: int
    mean: float
    std: float
    lo: float
    hi: float

    @property
    def contains_zero(self) -> bool:
        return not (self.lo > 0 or self.hi < 0)  # NaN bounds count as "contains zero"

    @property
    def degenerate(self) -> bool:
        """All values equal (n ≥ 2, zero spread): no t interval, no p-value (:func:`zero_spread`)."""
        return zero_spread(self.n, self.mean, self.std)


def mean_interval(values: Iterable[float], level: float = 0.95) -> Interval:
    """Mean, std and t interval of ``values`` (None and NaN left out)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return Interval(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    if zero_spread(n, mean, std):
        return Interval(n, mean, std, math.nan, math.nan)
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return Interval(n, mean, std, mean - half, mean + half)


# What a proxy cell and its baseline must share to be a pair: the same data split, the same batch size
# (so the same gradient steps), the same kind of device, the same precision (a bf16 cell on an A100 is
# no pair for an fp16 baseline on a V100) and the same epochs. A key a result does not record (older
# results) is not compared.
PAIR_KEYS = {"data.split": "split", "device.batch_size": "batch size", "device.type": "device type",
             "device.precision": "precision", "run.epochs": "epochs"}


def pair_mismatches(df: pd.DataFrame) -> pd.DataFrame:
    """DONE proxy cells whose DONE baseline trained differently (see :data:`PAIR_KEYS`): they are not
    paired. Columns: cell_id, baseline_id, differs (e.g. ``batch size 256 vs 192``)."""
    cols = ["cell_id", "baseline_id", "differs"]
    if df.empty or "baseline_id" not in df.columns:
        return pd.DataFrame(columns=cols)
    done = df[df["state"] == "DONE"]
    keys = [k for k in PAIR_KEYS if k in done.columns]
    base = done[done["role"] == "baseline"].set_index("_key")[keys] if keys else None
    rows = []
    for r in done[done["role"] == "proxy"].to_dict("records"):
        if base is None or r["baseline_id"] not in base.index:
            continue
        b = base.loc[r["baseline_id"]]
        differs = [f"{PAIR_KEYS[k]} {r[k]} vs {b[k]}" for k in keys
                   if pd.notna(r[k]) and pd.notna(b[k]) and r[k] != b[k]]
        if differs:
            rows.append([r["cell_id"], r["baseline_id"], "; ".join(differs)])
    return pd.DataFrame(rows, columns=cols)


def paired_differences(df: pd.DataFrame, metric: str = "test/acc") -> pd.DataFrame:
    """One row per proxy cell: its metric, its same-seed baseline's, and the difference.

    Columns: cell_id, config_id, train.seed, proxy, baseline (NaN when the baseline is not DONE, missing
    or not a pair: :func:`pair_mismatches`), diff, baseline_id, baseline_state. Proxy cells that are not
    DONE are left out.
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
    refused = set(pair_mismatches(df)["cell_id"])
    out.loc[out["cell_id"].isin(refused), ["baseline", "baseline_state"]] = [math.nan, "not a pair"]
    out["diff"] = out["proxy"] - out["baseline"]
    return out[cols].reset_index(drop=True)


def paired_p_value(mean: float, std: float, n: int) -> float:
    """Two-sided p-value of a paired t test that the mean difference is 0. NaN below 2 pairs, for NaN
    input, and when the differences are all equal (:func:`zero_spread`): the t statistic is then 0/0
    or ±∞, and no p-value can be read from it."""
    if n < 2 or not np.isfinite(mean) or not np.isfinite(std) or zero_spread(n, mean, std):
        return math.nan
    return 2 * (1 - t_cdf(abs(mean) / (std / math.sqrt(n)), n - 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (NaN stays NaN): many configurations, one family of tests."""
    p = np.asarray(p_values, dtype=float)
    ok = np.flatnonzero(~np.isnan(p))
    out = np.full(len(p), math.nan)
    m = len(ok)
    running = 0.0
    for rank, i in enumerate(ok[np.argsort(p[ok], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def notes_for(interval: Optional[Interval], missing_baselines: int, seeds: int) -> str:
    """The plain-words caveats of one paired number."""
    notes = []
    if missing_baselines:
        notes.append(f"no baseline for {missing_baselines} seed(s)")
    if 0 < seeds < MIN_SEEDS:
        notes.append(f"only {seeds} seed(s) (< {MIN_SEEDS})")
    if interval is not None and interval.degenerate:
        notes.append(f"degenerate test: all {interval.n} differences equal ({interval.mean:+.4g}), so the "
                     "t statistic is undefined (no interval, no p-value)")
    elif interval is not None and interval.n >= 2 and interval.contains_zero:
        notes.append("interval contains 0")
    if interval is not None and interval.n == 0:
        notes.append("no paired result")
    return "; ".join(notes)


def _intervals(groups: Any, level: float) -> pd.DataFrame:
    """n, mean, std and t-interval bounds of each group of a grouped Series (NaN values ignored); the
    bounds are NaN where the group's values are all equal (``degenerate``: :func:`zero_spread`)."""
    agg = groups.agg(["count", "mean", "std"])
    n = agg["count"].to_numpy()
    q = np.array([t_quantile(0.5 + level / 2, k - 1) if k >= 2 else math.nan for k in n])
    half = q * agg["std"].to_numpy() / np.sqrt(np.maximum(n, 1))
    agg["degenerate"] = [zero_spread(int(k), m, s) for k, m, s in zip(n, agg["mean"], agg["std"])]
    half = np.where(agg["degenerate"].to_numpy(dtype=bool), math.nan, half)
    agg["lo"], agg["hi"] = agg["mean"] - half, agg["mean"] + half
    return agg


def _notes(paired: np.ndarray, missing: np.ndarray, lo: np.ndarray, hi: np.ndarray, mean: np.ndarray,
           std: np.ndarray) -> list[str]:
    """:func:`notes_for` of each row of a summary."""
    return [notes_for(Interval(int(n), d, s, a, b), int(m), int(n))
            for n, m, a, b, d, s in zip(paired, missing, lo, hi, mean, std)]


def paired_summary(df: pd.DataFrame, metric: str = "test/acc", level: float = 0.95) -> pd.DataFrame:
    """One row per proxy configuration (all its seeds): proxy and baseline mean ± std, and the paired
    difference's mean, std and t interval over seeds, with ``note`` saying what weakens the number.
    """
    cols = ["config_id", "seeds", "paired", "proxy_mean", "proxy_std", "baseline_mean", "baseline_std",
            "diff_mean", "diff_std", "ci_lo", "ci_hi", "no_baseline", "few_seeds", "contains_zero",
            "degenerate", "note"]
    diffs = paired_differences(df, metric)
    if diffs.empty:
        return pd.DataFrame(columns=cols + ["p", "p_holm"])
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
    out["degenerate"] = d["degenerate"].to_numpy(dtype=bool)
    out["note"] = _notes(out["paired"], out["no_baseline"], out["ci_lo"], out["ci_hi"], out["diff_mean"],
                         out["diff_std"])
    out["p"] = [paired_p_value(m, s, int(n)) for m, s, n in zip(out["diff_mean"], out["diff_std"], out["paired"])]
    out["p_holm"] = holm(out["p"])
    return out[cols + ["p", "p_holm"]].reset_index(drop=True)


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
    res["note"] = _notes(res["paired_seeds"], res["missing"], res["ci_lo"], res["ci_hi"], res["diff_mean"],
                         res["diff_std"])
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
