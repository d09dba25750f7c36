"""``python -m proxyattention.report SWEEP_DIR [report.KEY=VALUE ...]`` — a sweep folder as a report.

Writes ``SWEEP_DIR/report/``: ``results.csv`` (one row per cell), ``report.md`` (the thesis-style tables,
paired proxy − baseline differences with 95% intervals, explainability, failed and unfinished cells,
checks), ``figures/*.png`` and ``maps/*.png`` (attention maps of a proxy model beside its baseline on the
same test images, with a CAM method other than the training one). Works on a sweep that is still
running: unfinished cells are listed, never silently dropped.

Options (``report.KEY=VALUE``, checked against :class:`ReportConfig`): ``report.method=eigengradcam``,
``report.maps=12`` (0: no attention maps, no torch), ``report.images=8``, ``report.tb_check=50``,
``report.metric=test/acc``, ``report.out=DIR``.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from launcher.cellstate import CellState
from proxyattention.analysis.figures import (
    MAX_PANELS,
    figure_bars,
    figure_curves,
    figure_history,
    figure_hyperparameters,
    figure_pareto,
    figure_search,
    pareto_front,
)
from proxyattention.analysis.maps import attention_grid, map_pairs
from proxyattention.analysis.stats import (
    baseline_summary,
    grouped_paired,
    notes_for,
    pair_mismatches,
    paired_summary,
)
from proxyattention.analysis.table import (
    EXPLAIN_METRICS,
    METRIC_DIRECTIONS,
    MIN_SEEDS,
    TRIAL_ROLES,
    ResultsError,
    check_tensorboard,
    config_labels,
    float_digits,
    fmt_param,
    load_results,
    results_csv_frame,
)
from proxyattention.config import CAM_METHODS

log = logging.getLogger(__name__)

BAR_FIGURE = "bars_test_acc.png"  # the figure the README shows: keep this name stable
HYPERPARAMETERS = ("proxy.threshold", "proxy.weight", "proxy.subset")
MAX_WAITING = 40  # PRUNED / RUNNING / PENDING cells listed by name (failed cells are always all listed)
STATES = tuple(s.value for s in CellState)
FAILED_STATES = tuple(s.value for s in CellState if s.failed)


@dataclass
class ReportConfig:
    method: str = "eigengradcam"  # CAM method for the attention-map grids (≠ the training method)
    maps: int = 12  # at most this many grids, one per proxy configuration; 0 = none
    images: int = 8  # test images per grid
    metric: str = "test/acc"
    level: float = 0.95  # confidence level of the intervals
    tb_check: int = 50  # DONE cells whose TensorBoard scalars are checked against result.json; -1 = all
    device: str = "cpu"
    out: Optional[str] = None  # default: SWEEP_DIR/report


def parse_overrides(args: Sequence[str]) -> ReportConfig:
    """``report.KEY=VALUE`` strings → a checked :class:`ReportConfig` (an unknown key is an error)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    dotlist = []
    for a in args:
        key, eq, value = a.partition("=")
        if not eq or not key.startswith("report."):
            raise SystemExit(f"error: {a!r} is not an option; options look like report.method=gradcam "
                             f"(keys: {', '.join(ReportConfig.__dataclass_fields__)})")
        dotlist.append(f"{key[len('report.'):]}={value}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(ReportConfig), OmegaConf.from_dotlist(dotlist))
    except OmegaConfBaseException as e:
        raise SystemExit(f"error: {e}".splitlines()[0] + f"; keys: "
                         f"{', '.join(ReportConfig.__dataclass_fields__)}") from None
    rc = ReportConfig(**OmegaConf.to_container(cfg))
    if rc.method not in CAM_METHODS:
        raise SystemExit(f"error: report.method={rc.method!r}; choose one of: {', '.join(CAM_METHODS)}")
    return rc


# --------------------------------------------------------------------------------------- formatting

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


# ------------------------------------------------------------------------------------------ tables

def _unfinished_rows(df: pd.DataFrame, labels: dict[str, str]) -> tuple[list[list[Any]], int]:
    """Table rows of the cells not DONE (every failed one, the first MAX_WAITING others: PRUNED, RUNNING,
    PENDING), and how many of the others were left out."""
    order = {s: i for i, s in enumerate((*FAILED_STATES, CellState.PRUNED.value, CellState.RUNNING.value,
                                         CellState.PENDING.value))}
    unfinished = df[df["state"] != CellState.DONE.value].sort_values(
        ["state", "cell_id"], key=lambda c: c.map(order).fillna(-1) if c.name == "state" else c)
    failed = unfinished[unfinished["state"].isin(FAILED_STATES)]
    waiting = unfinished.drop(failed.index)
    more = max(0, len(waiting) - MAX_WAITING)
    rows = []
    for _, r in pd.concat([failed, waiting.head(MAX_WAITING)]).iterrows():
        err = r.get("error")
        age = r.get("heartbeat_age_s")
        if r["state"] == CellState.RUNNING.value and isinstance(age, float) and not math.isnan(age):
            err = f"last heartbeat {age:.0f} s ago"
        rows.append([r["cell_id"], r["state"], labels.get(r["config_id"], ""), r["train.seed"],
                     err if isinstance(err, str) and err else "–"])
    return rows, more


def _states_section(df: pd.DataFrame, labels: dict[str, str]) -> list[str]:
    """Cell counts by state, and the table of cells not DONE."""
    counts = df["state"].value_counts()
    parts = [f"{counts[s]} {s}" for s in STATES if s in counts]
    other = [f"{v} {k}" for k, v in counts.items() if k not in STATES]
    out = [f"**{len(df)} cells:** " + ", ".join(parts + other) + "."]
    if (df["state"] == CellState.DONE.value).all():
        out.append("\nEvery cell is DONE.")
        return out
    out.append("\n## Cells not done\n")
    note = "These cells have no result and are left out of every number below."
    if (df["state"] == CellState.PRUNED.value).any():
        note += (" PRUNED cells were stopped early at a search's request: their partial results are left "
                 "out too.")
    out.append(note + "\n")
    rows, more = _unfinished_rows(df, labels)
    out.append(markdown_table(rows, ["cell", "state", "configuration", "seed", "error"]))
    if more:
        out.append(f"\n… and {more} more cells PRUNED, RUNNING or PENDING (all in results.csv).")
    return out


def _budget(cells: pd.DataFrame) -> str:
    """The training budget behind a row: its cells' epochs and gradient steps ("40 ep / 12,000 steps")."""
    def values(col: str) -> str:
        if col not in cells.columns:
            return "?"
        v = sorted({int(x) for x in cells[col].dropna()})
        return "?" if not v else (f"{v[0]:,}" if len(v) == 1 else f"{v[0]:,}–{v[-1]:,}")
    return f"{values('run.epochs')} ep / {values('run.steps')} steps"


def _row_cells(df: pd.DataFrame, **match: str) -> pd.DataFrame:
    """The DONE cells (proxy and baseline) of one table row."""
    done = df[df["state"] == "DONE"]
    for col, value in match.items():
        done = done[done[col].astype(str) == str(value)]
    return done


def _only(table: pd.DataFrame, ds: str, model: str) -> Optional[pd.Series]:
    """The row of ``table`` for one dataset/model, or None."""
    if table.empty:
        return None
    here = table[(table["dataset.name"].astype(str) == ds) & (table["model.name"].astype(str) == model)]
    return here.iloc[0] if len(here) else None


# What "best" is selected on: the final model's validation accuracy, the model whose test accuracy is
# reported. The peak over epochs (val/acc_best) is a maximum of noisy values: it favours the
# configurations whose validation accuracy fluctuates most, and the model at that peak is not the one tested.
SELECT_ON = "val/acc"


def _best_config(proxy: pd.DataFrame, val: pd.Series, ds: str, model: str) -> Optional[str]:
    """The proxy configuration of one dataset/model with the highest mean final validation accuracy
    (``val``: :data:`SELECT_ON` averaged per configuration; configurations without it are no candidates)."""
    here = proxy[(proxy["dataset.name"].astype(str) == ds) & (proxy["model.name"].astype(str) == model)]
    candidates = val[val.index.isin(here["config_id"])].dropna()
    return candidates.idxmax() if not candidates.empty else None


def _table_dataset_model(df: pd.DataFrame, metric: str, level: float) -> tuple[str, pd.DataFrame]:
    """Thesis Table 8.1: per dataset × model, baseline vs proxy (all configurations; the best one)."""
    by = ["dataset.name", "model.name"]
    base = baseline_summary(df, by, metric)
    pooled = grouped_paired(df, by, metric, level)
    summary = paired_summary(df, metric, level).set_index("config_id", drop=False)
    proxy = df[(df["state"] == "DONE") & (df["role"] == "proxy")]
    val = proxy.groupby("config_id")[SELECT_ON].mean() if SELECT_ON in proxy else pd.Series(dtype=float)
    keys = sorted(set(map(tuple, df.loc[df["state"] == "DONE", by].astype(str).values.tolist())))
    nan2 = (math.nan, math.nan)
    rows, fig_rows = [], []
    for ds, model in keys:
        bm, pm = _only(base, ds, model), _only(pooled, ds, model)
        best = _best_config(proxy, val, ds, model)
        bs = summary.loc[best] if best is not None and best in summary.index else None
        rows.append([
            ds, model,
            fmt_mean(bm["mean"], bm["std"], bm["n"]) if bm is not None else "no baseline",
            fmt_mean(pm.acc_mean, pm.acc_std, pm.cells) if pm is not None else "–",
            fmt_diff(pm.diff_mean, pm.ci_lo, pm.ci_hi) if pm is not None else "–",
            fmt_mean(bs.proxy_mean, bs.proxy_std, bs.seeds) if bs is not None else "–",
            fmt_diff(bs.diff_mean, bs.ci_lo, bs.ci_hi) if bs is not None else "–",
            "; ".join(x for x in ((f"all: {pm.note}" if pm is not None and pm.note else ""),
                                  (f"best: {bs.note}" if bs is not None and bs.note else "")) if x),
            _budget(_row_cells(df, **{"dataset.name": ds, "model.name": model})),
        ])
        fig_rows.append({"dataset": ds, "model": model,
                         "baseline": (bm["mean"], bm["std"]) if bm is not None else nan2,
                         "proxy (all)": (pm.acc_mean, pm.acc_std) if pm is not None else nan2,
                         "proxy (best)": (bs.proxy_mean, bs.proxy_std) if bs is not None else nan2})
    table = markdown_table(rows, ["dataset", "model", "baseline", "proxy (all configs)",
                                  "Δ all, per seed [95% CI]", "proxy (best config, selected on final val acc)",
                                  "Δ best [95% CI]", "note", "training"])
    table += ("\n\nThe best configuration is the one with the highest mean *final validation* accuracy "
              f"(`{SELECT_ON}`, of the same model whose test accuracy is shown; not the peak `val/acc_best`, a "
              "maximum over epochs that favours the configurations whose validation accuracy fluctuates "
              "most, reached by a model that is not the one tested). Its test Δ is reported after that "
              "selection, so it is still optimistic when many configurations were tried (see the "
              "Holm-adjusted p-values below).")
    return table, pd.DataFrame(fig_rows)


def _bins(df: pd.DataFrame, param: str) -> Optional[tuple[pd.DataFrame, dict[str, float], int]]:
    """A searched numeric key with more than :data:`MAX_BY_ROWS` distinct values among the DONE proxy
    cells, binned: ``(df with param replaced by each proxy cell's bin label, label → its lowest value,
    distinct values)``. Quantile bins of the distinct values, at most MAX_BY_ROWS and about two values or
    more each; each bin is labelled by the range of the values in it (``0.112–0.287``). None for a key to
    show value by value."""
    if param not in df.columns:
        return None
    proxy = df[df["role"] == "proxy"]
    done = proxy.loc[proxy["state"] == "DONE", param]
    if done.empty or not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                             for v in done.dropna()):
        return None
    values = np.unique(done.dropna().astype(float).to_numpy())
    if len(values) <= MAX_BY_ROWS:
        return None
    edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, min(MAX_BY_ROWS, len(values) // 2) + 1)))
    digits = float_digits(pd.Series(values))

    def index(v: float) -> int:
        return int(min(max(np.searchsorted(edges, v, side="right") - 1, 0), len(edges) - 2))

    members: dict[int, list[float]] = {}
    for v in values:
        members.setdefault(index(v), []).append(float(v))
    names = {i: (f"{fmt_param(min(m), digits)}–{fmt_param(max(m), digits)}" if len(m) > 1
                 else fmt_param(m[0], digits)) for i, m in members.items()}
    binned = df.copy()
    binned[param] = binned[param].astype(object)
    numeric = proxy[param].map(lambda v: isinstance(v, (int, float, np.integer, np.floating))
                               and not isinstance(v, bool) and not math.isnan(float(v)))
    binned.loc[numeric[numeric].index, param] = [names.get(index(float(v)), "") for v in
                                                 proxy.loc[numeric[numeric].index, param]]
    return binned, {names[i]: min(m) for i, m in members.items()}, len(values)


def _table_by(df: pd.DataFrame, param: str, metric: str, level: float,
              order: Optional[dict[str, float]] = None) -> str:
    """Thesis Tables 8.2–8.4: proxy cells by one hyperparameter, per dataset × model (``order``: the rows
    of a binned key, label → sort key)."""
    by = ["dataset.name", "model.name", param]
    g = grouped_paired(df, by, metric, level)
    if g.empty:
        return "_No finished proxy cells._"
    if order is not None:
        g = g.assign(_order=g[param].map(order)).sort_values(["dataset.name", "model.name", "_order"])
    proxies = df[df["role"] == "proxy"]
    digits = float_digits(proxies.loc[proxies["state"] == "DONE", param]) if order is None else 3
    rows = [[r["dataset.name"], r["model.name"], fmt_param(r[param], digits),
             fmt_mean(r.acc_mean, r.acc_std, r.cells),
             fmt_diff(r.diff_mean, r.ci_lo, r.ci_hi), r.paired_seeds, r.note,
             _budget(_row_cells(proxies, **{"dataset.name": r["dataset.name"], "model.name": r["model.name"],
                                            param: r[param]}))]
            for _, r in g.iterrows()]
    if param == "proxy.schedule":  # the baselines are the schedules without p
        b = baseline_summary(df, ["dataset.name", "model.name", "proxy.schedule"], metric)
        bases = df[df["role"] == "baseline"]
        rows += [[r["dataset.name"], r["model.name"], f"{r['proxy.schedule']} (baseline)",
                  fmt_mean(r["mean"], r["std"], r["n"]), "", "", "",
                  _budget(_row_cells(bases, **{"dataset.name": r["dataset.name"], "model.name": r["model.name"],
                                               "proxy.schedule": r["proxy.schedule"]}))]
                 for _, r in b.iterrows()]
        rows.sort(key=lambda x: (str(x[0]), str(x[1]), str(x[2])))
    return markdown_table(rows, ["dataset", "model", param.split(".")[-1], f"{metric} mean ± std",
                                 "Δ vs baseline, per seed [95% CI]", "paired seeds", "note", "training"])


def _table_configs(df: pd.DataFrame, labels: dict[str, str], metric: str, level: float) -> str:
    """Every proxy configuration beside its baseline over the same seeds."""
    s = paired_summary(df, metric, level)
    if s.empty:
        return "_No finished proxy cells._"
    s = s.assign(label=[labels.get(c, c) for c in s["config_id"]]).sort_values("label")
    done = df[df["state"] == "DONE"]
    rows = [[r.label, fmt_mean(r.proxy_mean, r.proxy_std, r.seeds),
             fmt_mean(r.baseline_mean, r.baseline_std, r.paired), fmt_diff(r.diff_mean, r.ci_lo, r.ci_hi),
             "–" if math.isnan(r.diff_std) else f"{r.diff_std:.3f}", _p(r.p), _p(r.p_holm), r.note or "ok",
             _budget(done[done["config_id"] == r.config_id])]
            for r in s.itertuples()]
    return markdown_table(rows, ["configuration", "proxy", "baseline (same seeds)", "Δ [95% CI]",
                                 "Δ std", "p", "p (Holm, all configurations)", "note", "training"])


def _p(value: float) -> str:
    return "–" if value is None or math.isnan(value) else ("< 0.001" if value < 0.001 else f"{value:.3f}")


def _explain_cells(s: Optional[pd.Series]) -> list[str]:
    """The two cells of one explainability metric: baseline → proxy means, and the paired Δ."""
    if s is None or s["paired"] == 0:
        return ["–", "–"]
    diff = fmt_diff(s.diff_mean, s.ci_lo, s.ci_hi, digits=3)
    if s.get("degenerate", False):
        diff += f" (all {int(s.paired)} Δ equal: no interval)"
    elif s.paired >= 2 and s.contains_zero:
        diff += " (contains 0)"
    return [f"{s.baseline_mean:.3g} → {s.proxy_mean:.3g}", diff]


def _table_explain(df: pd.DataFrame, labels: dict[str, str], level: float) -> Optional[str]:
    """Per proxy configuration, each explainability metric, baseline → proxy and the paired Δ."""
    metrics = [m for m in EXPLAIN_METRICS if m in df.columns and df[m].notna().any()]
    if not metrics:
        return None
    header = ["configuration"]
    for m in metrics:
        arrow = "↑" if METRIC_DIRECTIONS[m] else "↓"
        header += [f"{m.split('/')[1]} {arrow} baseline → proxy", "Δ [95% CI]"]
    summaries = {m: paired_summary(df, m, level).set_index("config_id") for m in metrics}
    config_ids = sorted(summaries[metrics[0]].index, key=lambda c: labels.get(c, c))
    rows = []
    notes = set()
    for c in config_ids:
        row = [labels.get(c, c)]
        for m in metrics:
            s = summaries[m].loc[c] if c in summaries[m].index else None
            row += _explain_cells(s)
            note = notes_for(None, int(s.no_baseline), int(s.paired)) if s is not None and s["paired"] else ""
            if note:
                notes.add(f"{labels.get(c, c)}: {note}")
        rows.append(row)
    text = markdown_table(rows, header)
    if notes:
        text += "\n\nCaveats: " + " · ".join(sorted(notes))
    return text


def _explain_method_notes(df: pd.DataFrame) -> list[str]:
    """A caveat where proxy cells were judged with the CAM method they were trained with."""
    if "explain.method" not in df.columns:
        return []
    same = df[(df["role"] == "proxy") & (df["explain.method"] == df["method.name"])]
    if same.empty:
        return []
    return [f"- {len(same)} proxy cell(s) were judged with their own training method "
            f"({', '.join(sorted(same['method.name'].unique()))}); their explainability numbers favour "
            "the proxy model (set explain.method to another method)."]


def _devices_line(df: pd.DataFrame) -> list[str]:
    """Where the DONE cells ran: each device by name, with its type and precision, and its cell count."""
    done = df[df["state"] == "DONE"]
    if done.empty or "device.type" not in done.columns:
        return []
    cols = ["device.name", "device.type", "device.precision"]
    runs = done.reindex(columns=cols).astype(object)
    counts = Counter(runs.where(runs.notna(), None).itertuples(index=False, name=None))

    def label(key: tuple) -> str:
        name, kind, precision = key
        detail = ", ".join(str(v) for v in (kind, precision) if v)
        return f"{name or 'an unnamed device'}" + (f" ({detail})" if detail else "")

    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], label(kv[0])))
    return ["- Devices: " + "; ".join(f"{n} cell(s) on {label(k)}" for k, n in ordered) + "."]


def _device_notes(df: pd.DataFrame) -> list[str]:
    """Caveats where cells of one dataset × model table ran on different device types, or on different
    devices of one type (a V100 and an A100)."""
    done = df[df["state"] == "DONE"]
    if done.empty or "device.type" not in done.columns:
        return []
    notes = []
    for (ds, model), group in done.groupby(["dataset.name", "model.name"], sort=True):
        counts = group["device.type"].dropna().value_counts()
        names = group["device.name"].dropna().value_counts() if "device.name" in group else counts.iloc[0:0]
        if len(counts) > 1:
            mix = ", ".join(f"{n} on {kind}" for kind, n in counts.sort_index().items())
            notes.append(f"- {ds} / {model}: cells ran on different device types ({mix}); timings, and "
                         "through the precision used, accuracies are not strictly comparable.")
        elif len(names) > 1:
            mix = ", ".join(f"{n} on {name}" for name, n in names.sort_index().items())
            notes.append(f"- {ds} / {model}: cells ran on different devices ({mix}); timings are not "
                         "comparable, and accuracies only where the precision is the same.")
    return notes


def _refused_pairs(df: pd.DataFrame) -> list[str]:
    """The proxy cells left unpaired because their baseline trained differently."""
    bad = pair_mismatches(df)
    if bad.empty:
        return []
    return ["", "## Pairs refused", "",
            f"{len(bad)} proxy cell(s) were not compared with their baseline, which trained differently "
            "(a pair must share the split, batch size, device type, precision and epochs; set "
            "`train.batch_size` to a number and run both on one kind of GPU — the precision follows the "
            "GPU: bf16 from compute capability 8.0, fp16 or fp32 below):", ""] + \
        [f"- {r.cell_id} vs baseline {r.baseline_id}: {r.differs}" for r in bad.itertuples()]


# -------------------------------------------------------------------------------------------- build

def _tb_section(df: pd.DataFrame, limit: int) -> list[str]:
    """The TensorBoard check of the first ``limit`` DONE cells (-1: all)."""
    done = df[(df["state"] == "DONE") & df["tb_dir"].notna()].sort_values("cell_id") \
        if "tb_dir" in df else df.iloc[0:0]
    if limit >= 0:
        done = done.head(limit)
    if done.empty:
        return ["- TensorBoard: no finished cell with a tb/ folder to check."]
    bad = {}
    for r in done.itertuples():
        problems = check_tensorboard(r.dir)
        if problems:
            bad[r.cell_id] = problems
    total = int(((df["state"] == "DONE") & df["tb_dir"].notna()).sum())
    head = f"- TensorBoard scalars (read with EventAccumulator) checked against result.json for " \
           f"{len(done)} of {total} finished cells: "
    if not bad:
        return [head + "all agree."]
    lines = [head + f"**{len(bad)} disagree**:"]
    for cid, problems in bad.items():
        lines.append(f"  - {cid}: " + "; ".join(problems[:3]) + (" …" if len(problems) > 3 else ""))
    return lines


def _figures_section(df: pd.DataFrame, labels: dict[str, str], bar_rows: pd.DataFrame, metric: str,
                     out: Path) -> list[str]:
    """Draw the figures into ``out/figures``; returns the markdown that shows them."""
    md, figs = [], []
    if figure_bars(bar_rows, out / "figures" / BAR_FIGURE, metric):
        figs.append((BAR_FIGURE, "proxy vs baseline per dataset/model"))
    name = f"{metric.replace('/', '_')}_vs_hyperparameters.png"
    drawn = figure_hyperparameters(df, HYPERPARAMETERS, out / "figures" / name, metric)
    if drawn:
        figs.append((name, f"{metric} against {', '.join(drawn)}"))
    pairs = sorted(set(map(tuple, df.loc[df["state"] == "DONE", ["dataset.name", "model.name"]]
                           .astype(str).values.tolist())))
    if figure_curves(df, pairs, labels, out / "figures" / "learning_curves.png", SELECT_ON):
        figs.append(("learning_curves.png", "validation accuracy per epoch"))
        if len(pairs) > MAX_PANELS:
            md += ["", f"_Learning curves show the first {MAX_PANELS} of {len(pairs)} dataset/model pairs._"]
    return md + ["", "## Figures", ""] + [f"![{alt}](figures/{name})" for name, alt in figs]


GRID_SWEEPERS = ("CellSweeper", "BasicSweeper")
STUDY_FILE = "study.json"  # written into the sweep folder by launcher.optuna_sweeper
PARETO_FIGURE = "search_pareto.png"
HISTORY_FIGURE = "search_history.png"
SEARCH_FIGURE = "search.png"
MAX_BY_ROWS = 5  # a searched key with more distinct values than this is binned in its "By" table
_SWEEP_CALL = re.compile(r"^\s*(interval|int|float|tag|choice|range|shuffle)\s*\(")


@dataclass
class Search:
    """An adaptive sweep, as its ``multirun.yaml``, ``study.json`` and persisted study describe it."""

    target: str
    keys: list[str]  # the sweeper's params, searched or fixed
    searched: list[str]  # the keys it searches: sweeps in params or on the command line, the study's own
    objectives: list[str]
    directions: list[str]
    gain: bool  # objective_vs_baseline: each trial's value is its gain over the paired baseline
    record: Optional[dict]  # study.json
    study: Any = None  # the persisted optuna study, where optuna is installed and can open it
    why_no_study: str = ""

    @property
    def minimize(self) -> bool:
        return self.directions[0].lower() == "minimize"


def _sweep_keys(lines: Sequence[str]) -> list[str]:
    """The keys of ``KEY=VALUE`` override lines that are sweeps (``interval(…)``, ``choice(…)``,
    ``range(…)``, ``a,b``), read as Hydra reads them: what an adaptive sweeper searches. A later plain line
    for the same key fixes it again; ``hydra.*`` keys are never searched."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser: Any = OverridesParser.create()
    except ImportError:
        parser = None
    found: dict[str, bool] = {}
    for line in lines:
        key, eq, value = line.partition("=")
        if not eq:
            continue
        try:
            o = parser.parse_override(line)
            key, swept = str(o.key_or_group), bool(o.is_sweep_override())
        except Exception:  # no Hydra, or a line it cannot parse: the plain shapes of a sweep
            key = key.lstrip("+~")
            swept = bool(_SWEEP_CALL.match(value)) or ("," in value and value.strip()[:1] not in "'\"[{")
        if key.startswith("hydra.") or "." not in key:
            continue
        found[key] = swept
    return [k for k, s in found.items() if s]


def _search_of(sweep: Path) -> Optional[Search]:
    """The adaptive sweep of a sweep folder (from its ``multirun.yaml``; the study's own ``study.json``
    wins on objectives and directions), or None for a grid sweep or a folder without ``multirun.yaml``."""
    import yaml

    try:
        hydra_cfg = (yaml.safe_load((sweep / "multirun.yaml").read_text()) or {}).get("hydra", {})
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    if not isinstance(hydra_cfg, dict):
        return None
    sweeper = hydra_cfg.get("sweeper") or {}
    target = str(sweeper.get("_target_", ""))
    if not target or target.endswith(GRID_SWEEPERS):
        return None
    params = sweeper.get("params") or {}
    task = (hydra_cfg.get("overrides") or {}).get("task") or []
    searched = _sweep_keys([f"{k}={v}" for k, v in params.items()] + [str(t) for t in task])
    launcher = hydra_cfg.get("launcher") or {}
    objectives = launcher.get("objective") or "val/acc_best"
    objectives = [str(objectives)] if isinstance(objectives, str) else [str(o) for o in objectives]
    direction = sweeper.get("directions") or sweeper.get("direction") or "maximize"
    directions = [str(direction)] if isinstance(direction, str) else [str(d) for d in direction]
    record = _study_record(sweep)
    if record and record.get("directions"):  # the study's own word wins over multirun.yaml
        directions = [str(d) for d in record["directions"]]
        objectives = [str(o) for o in (record.get("objective") or objectives)]
    gain = bool(record.get("objective_vs_baseline") if record else launcher.get("objective_vs_baseline"))
    study, why = _open_study(sweep, record)
    if study is not None:
        for t in study.get_trials(deepcopy=False):
            searched += [k for k in t.distributions if k not in searched]
    return Search(target, [str(k) for k in params], sorted(set(searched)), objectives, directions, gain,
                  record, study, why)


def _search_section(df: pd.DataFrame, sweep: Path, out: Path, search: Optional[Search] = None,
                    metric: str = "test/acc", level: float = 0.95) -> list[str]:
    """For a sweep run by an adaptive sweeper (Optuna, …; read from its ``multirun.yaml``): the study's
    trials by state, the optimisation history (``figures/search_history.png``), the parameter importances,
    the best trial by the objective the sweeper optimised (validation) with its paired baseline and the
    paired Δ, and the objective against each searched key. A two-objective study (``directions`` of two)
    has no single best trial: its Pareto front instead, a figure and a table (:func:`_pareto_section`)."""
    search = search if search is not None else _search_of(sweep)
    if search is None:
        return []
    objectives, directions = search.objectives, search.directions
    objective = objectives[0]  # two objectives: the first for the history and the figure against each key
    proxy = df[(df["state"] == "DONE") & (df["role"] == "proxy")]
    saw = " and ".join(f"`{o}`" for o in objectives)
    what = f" searching {', '.join(f'`{k}`' for k in search.searched)}" if search.searched else ""
    md = ["", "## Search", "", f"An adaptive sweep (`{search.target.rsplit('.', 1)[-1]}`){what}: {len(proxy)} "
          f"DONE trials, each a cell; the sweeper saw {saw} (validation, so the test numbers below were not "
          "used to choose)."]
    history = _history_trials(search.study)
    if history is not None:
        counts = Counter(t["state"] for t in history)
        asked = (search.record or {}).get("n_trials")
        plural = "s" if len(history) != 1 else ""
        md[-1] += (f" The study `{search.study.study_name}` holds {len(history)} trial{plural}"
                   + (f" of the {asked} asked" if isinstance(asked, int) else "") + ": "
                   + ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: TRIAL_ORDER.get(kv[0], 9)))
                   + ".")
    md += _history_section(search, history, out)
    md += _importances_section(search)
    if len(objectives) == 2 and len(directions) == 2:  # no single best trial: the Pareto front instead
        md += _pareto_section(df, sweep, out, search.record, objectives, directions, search.keys, search.gain,
                              study=search.study)
    else:
        md += _best_section(df, search, history, metric, level)
    drawn = figure_search(df, search.searched or search.keys, out / "figures" / SEARCH_FIGURE, objective,
                          minimize=search.minimize)
    if drawn:
        md += ["", "### Objective against each searched key", "",
               f"![{objective} against {', '.join(drawn)}](figures/{SEARCH_FIGURE})"]
    return md


TRIAL_ORDER = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2, "RUNNING": 3, "WAITING": 4}


def _history_trials(study: Any) -> Optional[list[dict]]:
    """Every trial of a study: ``[{"number", "state", "value" (the first objective's, or None), "last" (a
    PRUNED trial's last intermediate value, or None), "cell", "params"}]``; None without a study."""
    if study is None:
        return None
    out = []
    for t in study.get_trials(deepcopy=False):
        values = t.values
        value = float(values[0]) if values else None
        steps = t.intermediate_values or {}
        last = float(steps[max(steps)]) if steps and t.state.name == "PRUNED" else None
        out.append({"number": t.number, "state": t.state.name, "value": value, "last": last,
                    "cell": t.user_attrs.get("cell"), "params": dict(t.params)})
    return out


def _history_section(search: Search, history: Optional[list[dict]], out: Path) -> list[str]:
    """The optimisation history figure, and the trials without a value (PRUNED, FAIL, …) listed."""
    md = ["", "### Optimisation history", ""]
    if history is None:
        return md + [f"_No optimisation history: {search.why_no_study}._"]
    objective = search.objectives[0]
    if figure_history(history, out / "figures" / HISTORY_FIGURE, objective, minimize=search.minimize):
        best = "lowest" if search.minimize else "highest"
        md += [f"`{objective}` of each COMPLETE trial by trial number, and the {best} so far (line)"
               + (" (a gain over the paired baseline)" if search.gain else "")
               + (" (the first of the two objectives)" if len(search.objectives) > 1 else "") + ".", "",
               f"![optimisation history of {objective}](figures/{HISTORY_FIGURE})"]
    else:
        md.append(f"_No optimisation history yet: no COMPLETE trial with a value of `{objective}`._")
    others = [t for t in history if t["state"] != "COMPLETE"]
    if others:
        def one(t: dict) -> str:
            cell = f", cell `{t['cell']}`" if t["cell"] else ""
            last = f", last reported {t['last']:.4f}" if t["last"] is not None else ""
            return f"{t['number']} ({t['state']}{cell}{last})"

        md += ["", "Trials without a value (marked in the figure along the bottom, or at their last reported "
               "value): " + "; ".join(one(t) for t in sorted(others, key=lambda t: t["number"])) + "."]
    return md


def _importances_section(search: Search) -> list[str]:
    """fANOVA parameter importances of the persisted study (one column per objective), or one line on
    why there are none."""
    md = ["", "### Parameter importances", ""]
    if search.study is None:
        return md + [f"_No parameter importances: {search.why_no_study}._"]
    from optuna.trial import TrialState

    complete = search.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    distinct = {tuple(sorted((k, repr(v)) for k, v in t.params.items())) for t in complete}
    if len(complete) < 2 or len(distinct) < 2:
        return md + [f"_No parameter importances: they need at least 2 COMPLETE trials with different "
                     f"parameters ({len(complete)} COMPLETE, {len(distinct)} distinct parameter set"
                     f"{'s' if len(distinct) != 1 else ''})._"]
    n = len(search.study.directions)
    columns = []
    try:
        from optuna.importance import FanovaImportanceEvaluator, get_param_importances

        for i in range(n):
            target = None if n == 1 else (lambda t, i=i: t.values[i])
            columns.append(get_param_importances(search.study, evaluator=FanovaImportanceEvaluator(seed=0),
                                                 target=target))
    except Exception as e:  # optuna's own refusal (too few trials, a dynamic space, …)
        return md + [f"_No parameter importances: optuna could not compute them ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else ''})._"]
    names = sorted(set().union(*columns), key=lambda p: (-float(columns[0].get(p, 0.0)), p))
    rows = [[f"`{p}`"] + [f"{float(c.get(p, 0.0)):.3f}" for c in columns] for p in names]
    header = ["parameter"] + [f"importance for `{o}`" for o in search.objectives[:n]]
    return md + [f"fANOVA importances (`optuna.importance`, seed 0) over the {len(complete)} COMPLETE trials: "
                 "the share of the objective's variance each parameter explains (each column sums to 1). With "
                 "few trials they are a rough guide.", "", markdown_table(rows, header)]


def _best_section(df: pd.DataFrame, search: Search, history: Optional[list[dict]], metric: str,
                  level: float) -> list[str]:
    """The best trial by the (validation) objective, direction-aware, with its searched parameters, its
    ``metric`` beside its paired baseline's, and the paired Δ with its interval over seeds."""
    objective = search.objectives[0]
    md = ["", "### Best trial", ""]
    proxy = df[(df["state"] == "DONE") & (df["role"] == "proxy")]
    sign = 1.0 if search.minimize else -1.0
    best, number, value = None, None, math.nan
    if history is not None:  # the study's own values (a gain, with objective_vs_baseline)
        ranked = sorted((t for t in history if t["state"] == "COMPLETE" and t["value"] is not None
                         and not math.isnan(t["value"])), key=lambda t: (sign * t["value"], t["number"]))
        for t in ranked:
            here = proxy[proxy["cell_id"] == t["cell"]]
            if len(here):
                best, number, value = here.iloc[0], t["number"], t["value"]
                break
    if best is None and objective in proxy and proxy[objective].notna().any():
        values = proxy[objective].astype(float)
        best = proxy.loc[values.idxmin() if search.minimize else values.idxmax()]
        value = float(best[objective])
        record = search.record or {}
        number = record.get("best_trial") if record.get("best_cell") == best["cell_id"] else None
    if best is None:
        return md + [f"_No DONE trial with a value of `{objective}` yet._"]
    n_complete = sum(t["state"] == "COMPLETE" for t in history) if history is not None else len(proxy)
    keys = [k for k in (search.searched or search.keys) if k in best.index]
    chosen = ", ".join(f"`{k}={fmt_param(best[k])}`" for k in keys)
    trial = f"trial {number}, " if number is not None else ""
    better = "lowest" if search.minimize else "highest"
    gain = " (gain over its paired baseline)" if search.gain and history is not None else ""
    md.append(f"Best trial ({better} `{objective}`{gain}, a validation metric, among {n_complete} COMPLETE "
              f"trials): {trial}cell `{best['cell_id']}`" + (f", {chosen}" if chosen else "")
              + f": `{objective}` {value:.4f}.")
    md.append("")
    md.append(_best_versus_baseline(df, best, metric, level, n_complete))
    return md


def _best_versus_baseline(df: pd.DataFrame, best: pd.Series, metric: str, level: float, tried: int) -> str:
    """One line: the best configuration's ``metric``, its paired baseline's, and the paired Δ with its
    interval over seeds (:func:`paired_summary`, as every proxy-vs-baseline number of the report);
    ``tried``: the trials it was chosen among."""
    summary = paired_summary(df, metric, level)
    s = summary[summary["config_id"] == best["config_id"]]
    if s.empty:
        return f"Its `{metric}`: not recorded."
    s = s.iloc[0]
    seeds = int(s.seeds)
    line = f"Test: `{metric}` {fmt_mean(s.proxy_mean, s.proxy_std, seeds, digits=4)}"
    if s.paired == 0:
        state = best.get("baseline_state")
        return line + (f"; no paired baseline result (its baseline `{best.get('baseline_id')}` is "
                       f"{state if isinstance(state, str) else 'missing'}), so no Δ.")
    line += (f", its paired baseline (same seed{'s' if s.paired > 1 else ''}) "
             f"{fmt_mean(s.baseline_mean, s.baseline_std, int(s.paired), digits=4)}: "
             f"Δ {fmt_diff(s.diff_mean, s.ci_lo, s.ci_hi, digits=4)}")
    if s.paired >= 2 and not s.degenerate:
        line += f" ({level:.0%} CI over {int(s.paired)} seeds, p = {_p(s.p)})."
    elif s.paired >= 2:
        line += f" (all {int(s.paired)} differences equal: no interval)."
    else:
        line += (f"; no {level:.0%} interval: it needs this configuration trained with at least 2 seeds (a "
                 "search trains one per trial; rerun these parameters with more `train.seed` values).")
    if tried > 1:
        line += (f" Chosen as the best of {tried} trials (on validation, not on this test split), this Δ is "
                 "still optimistic.")
    return line


def _study_record(sweep: Path) -> Optional[dict]:
    """The sweep folder's ``study.json`` (the study's name, storage, directions, objective), or None."""
    import json

    try:
        d = json.loads((sweep / STUDY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and isinstance(d.get("name"), str) else None


def _open_study(sweep: Path, record: Optional[dict]) -> tuple[Any, str]:
    """``(study, "")``: the persisted study named by ``study.json``, opened with optuna; or ``(None, why)``
    when there is no record, optuna is not installed, or the storage is missing or cannot be read."""
    if not record:
        return None, f"the sweep folder has no readable {STUDY_FILE} naming the study"
    if not record.get("storage"):
        return None, f"{STUDY_FILE} names no storage"
    try:
        import optuna
    except ImportError:
        return None, "optuna is not installed (pip install -e '.[optuna]'), so the study cannot be read"
    storage: Any = str(record["storage"])
    try:
        if record.get("storage_kind") == "journal":
            path = Path(storage)
            if not path.is_file() and (sweep / path.name).is_file():  # the sweep folder was moved
                path = sweep / path.name
            if not path.is_file():
                return None, f"the study's journal {path} is missing"
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            storage = JournalStorage(JournalFileBackend(str(path)))
        elif storage.startswith("sqlite:///") and not Path(storage[len("sqlite:///"):]).is_file():
            return None, f"the study's database {storage} is missing"  # opening it would create an empty one
        return optuna.load_study(study_name=record["name"], storage=storage), ""
    except Exception as e:  # a damaged or unreachable storage must not sink the report
        log.warning("the study %s could not be read (%s); the search section uses the cells' results",
                    record.get("name"), e)
        return None, f"the study could not be read ({type(e).__name__})"


def _trials_from_study(sweep: Path, record: Optional[dict], study: Any = None) -> Optional[list[dict]]:
    """Every COMPLETE trial of the persisted study, read with optuna: ``[{"trial", "cell", "values",
    "params"}]``; None when optuna is not installed or the study cannot be opened (then the cells say)."""
    if study is None:
        study, _ = _open_study(sweep, record)
    if study is None:
        return None
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [{"trial": t.number, "cell": t.user_attrs.get("cell"), "values": [float(v) for v in t.values],
             "params": dict(t.params)} for t in trials if t.values is not None]


def _trials_from_cells(df: pd.DataFrame, record: Optional[dict], names: Sequence[str], keys: Sequence[str],
                       gain: bool) -> list[dict]:
    """The trials as the cells give them (without optuna): each DONE proxy cell's objectives (minus its
    paired baseline's with ``objective_vs_baseline``); trial numbers where ``study.json`` names the cell."""
    numbers = {p.get("cell"): p.get("trial") for p in (record or {}).get("pareto_front") or []
               if isinstance(p, dict) and p.get("cell")}
    done = df[df["state"] == "DONE"]
    by_id = done.set_index("cell_id")
    out = []
    for _, row in done[done["role"] == "proxy"].iterrows():
        values = []
        for name in names:
            v = float(row[name]) if name in row and pd.notna(row[name]) else math.nan
            if gain:
                b = row.get("baseline_id")
                base = by_id.loc[b] if isinstance(b, str) and b in by_id.index else None
                v = v - float(base[name]) if base is not None and name in base and pd.notna(base[name]) else math.nan
            values.append(v)
        out.append({"trial": numbers.get(row["cell_id"]), "cell": row["cell_id"], "values": values,
                    "params": {k: row[k] for k in keys if k in row and pd.notna(row[k])}})
    return out


def _fmt_value(v: Any) -> str:
    """An objective's value: 4 decimals (accuracies), 4 significant digits for large values."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.4g}"


def _pareto_section(df: pd.DataFrame, sweep: Path, out: Path, record: Optional[dict], names: Sequence[str],
                    directions: Sequence[str], keys: Sequence[str], gain: bool, study: Any = None) -> list[str]:
    """A two-objective study: every COMPLETE trial's two values, the Pareto-optimal ones highlighted and
    joined (``figures/search_pareto.png``) and listed in a table, best first by the first objective."""
    trials = _trials_from_study(sweep, record, study)
    source = "the persisted study"
    if trials is None:
        trials, source = _trials_from_cells(df, record, names, keys, gain), "the cells' results"
    trials = [t for t in trials if not any(math.isnan(v) for v in t["values"])]
    dirs = [d.lower() for d in directions]
    what = " and ".join(f"`{n}` ({d}{', gain over the paired baseline' if gain else ''})"
                        for n, d in zip(names, dirs))
    md = ["", "### Pareto front", "", f"Two objectives: {what}. {len(trials)} COMPLETE trials (from {source})."]
    if not trials:
        return md
    front = pareto_front([t["values"] for t in trials], dirs)
    labels = [f"#{t['trial']}" if t["trial"] is not None else str(t["cell"])[:6] for t in trials]
    if figure_pareto([t["values"] for t in trials], front, names, dirs, out / "figures" / PARETO_FIGURE, labels):
        md += ["", f"![Pareto front of {names[0]} and {names[1]}](figures/{PARETO_FIGURE})"]
    first_sign = -1.0 if dirs[0] == "maximize" else 1.0
    rows = []
    for i in sorted(front, key=lambda i: (first_sign * trials[i]["values"][0],
                                          trials[i]["trial"] if trials[i]["trial"] is not None else -1)):
        t = trials[i]
        params = ", ".join(f"`{k}={fmt_param(v)}`" for k, v in sorted(t["params"].items()))
        rows.append(["—" if t["trial"] is None else t["trial"], f"`{t['cell']}`" if t["cell"] else "—",
                     _fmt_value(t["values"][0]), _fmt_value(t["values"][1]), params or "—"])
    md += ["", f"{len(front)} Pareto-optimal trial{'s' if len(front) != 1 else ''} (no other trial is at "
           "least as good in both objectives and better in one):", "",
           markdown_table(rows, ["trial", "cell", f"{names[0]} ({dirs[0][:3]})", f"{names[1]} ({dirs[1][:3]})",
                                 "params"])]
    return md


def _accuracy_sections(df: pd.DataFrame, labels: dict[str, str], rc: ReportConfig, out: Path,
                       search: Optional[Search] = None) -> list[str]:
    """The tables of ``rc.metric`` (by dataset and model, by each hyperparameter, every configuration),
    the explainability table and the figures."""
    metric = rc.metric
    if metric not in df.columns:
        return ["", f"_No finished cell has `{metric}` yet._"]
    table, bar_rows = _table_dataset_model(df, metric, rc.level)
    chosen = ("\"all configs\" pools every proxy configuration (Δ averaged per seed first); \"best\" is the "
              "configuration with the highest mean final validation accuracy (chosen without the test set).")
    if search is not None and (search.objectives[:1] != ["val/acc"] or search.gain):
        chosen += (f" The Search section's best trial is chosen on the study's objective instead "
                   f"(`{search.objectives[0]}`{', its gain over the baseline' if search.gain else ''}), so the "
                   "two can differ.")
    md = ["", "## Test accuracy by dataset and model", "", chosen, "", table]
    searched = search.searched if search is not None else []
    for param in ("proxy.schedule", *HYPERPARAMETERS, *[k for k in searched if k not in HYPERPARAMETERS]):
        if param not in df.columns:
            continue
        md += ["", f"## By {param.split('.')[-1]}", ""]
        binned = _bins(df, param) if param in searched else None
        if binned is None:
            md.append(_table_by(df, param, metric, rc.level))
            continue
        frame, order, n = binned
        md += [f"`{param}` was searched: its {n} values are grouped into {len(order)} quantile bins, each "
               "labelled by the range of the trial values in it; each trial's own value is in the Search "
               f"section's figure (`figures/{SEARCH_FIGURE}`).", "",
               _table_by(frame, param, metric, rc.level, order)]
    md += ["", "## Every proxy configuration, paired with its baseline", "",
           _table_configs(df, labels, metric, rc.level)]
    explain = _table_explain(df, labels, rc.level)
    if explain:
        md += ["", "## Explainability (test images)", "",
               "Per configuration: baseline → proxy means and the paired Δ [95% CI]. AD: Average Drop "
               "(lower is better), AI: Average Increase, AG: Average Gain, insertion (higher) and "
               "deletion (lower) areas, pointing: share of CAM energy inside the object mask (higher). "
               "Maps from each cell's `explain.method`.", "", explain]
    return md + _figures_section(df, labels, bar_rows, metric, out)


def _maps_section(df: pd.DataFrame, labels: dict[str, str], rc: ReportConfig, out: Path) -> list[str]:
    """Draw up to ``rc.maps`` attention-map grids into ``out/maps``; returns the markdown that shows them."""
    pairs = map_pairs(df, rc.maps) if rc.maps > 0 else []
    if not pairs:
        return []
    (out / "maps").mkdir(exist_ok=True)
    md = ["", "## Attention maps", "",
          "The same test images for a proxy model and its baseline (same seed). Captions: predicted "
          "class and its probability (x: wrong). Maps explain the true class.", ""]
    for prow, brow in pairs:
        name = f"maps/{prow['cell_id']}.png"
        try:
            method = attention_grid(prow, brow, out / name, images=rc.images, method=rc.method,
                                    device=rc.device)
        except Exception as e:  # a broken checkpoint must not sink the whole report
            log.warning("attention map of %s failed: %s", prow["cell_id"], e)
            md.append(f"- {labels.get(prow['config_id'])}, seed {prow['train.seed']}: "
                      f"attention map failed ({type(e).__name__}: {e})")
            continue
        note = "" if method == rc.method else f" ({rc.method} trained this model; judged with {method})"
        md += [f"**{labels.get(prow['config_id'])}**, seed {prow['train.seed']} — {method}{note}", "",
               f"![attention maps]({name})", ""]
    return md


def build_report(sweep_dir: str | Path, rc: Optional[ReportConfig] = None) -> Path:
    """Write the report folder of a sweep; returns the path of ``report.md``."""
    rc = rc or ReportConfig()
    sweep = Path(sweep_dir)
    out = Path(rc.out) if rc.out else sweep / "report"
    df = load_results(sweep)  # first: a folder that is not a sweep is named as such
    jobs = ~df["role"].isin(list(TRIAL_ROLES)) & df["role"].notna() if not df.empty else None
    if jobs is not None and jobs.all():
        raise ResultsError(f"{sweep} holds another app's jobs, not Proxy Attention trials: this report is for "
                           f"Proxy Attention trials; see its table with python -m launcher.results {sweep}")
    other = int(jobs.sum()) if jobs is not None else 0
    df = df[~jobs] if other else df
    try:
        (out / "figures").mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ResultsError(f"cannot write the report into {out} ({e.strerror or e}); write it elsewhere "
                           "with report.out=DIR") from None
    results_csv_frame(df).to_csv(out / "results.csv", index=False)
    md = [f"# Proxy Attention report — `{sweep}`", ""]
    if other:
        md += [f"{other} cell{'s' if other != 1 else ''} of another app left out (`python -m launcher.results "
               f"{sweep}` lists them).", ""]
    if df.empty:
        md.append("No cells yet (no cells/*/config.yaml).")
        (out / "report.md").write_text("\n".join(md) + "\n")
        return out / "report.md"
    search = _search_of(sweep)
    labels = config_labels(df, always=search.searched if search is not None else ())
    md += _states_section(df, labels)
    problems = df[df["problem"].astype(bool)] if "problem" in df else df.iloc[0:0]
    if not problems.empty:
        md += ["", "## Problems", ""] + [f"- {r.cell_id}: {r.problem}" for r in problems.itertuples()]
    md += ["", f"Numbers are `{rc.metric}` on each cell's held-out test split, as mean ± std (n = cells or "
               f"seeds). **Δ** is proxy − baseline of the *same seed* (same split, initial weights, data "
               f"order and epochs), with a {rc.level:.0%} Student-t interval over seeds. Notes flag a "
               f"missing baseline, fewer than {MIN_SEEDS} seeds, and intervals that contain 0 (no "
               f"evidence of a difference)."]
    md += _search_section(df, sweep, out, search, rc.metric, rc.level)
    md += _accuracy_sections(df, labels, rc, out, search)
    md += _maps_section(df, labels, rc, out)
    md += _refused_pairs(df)
    md += ["", "## Checks", ""] + _tb_section(df, rc.tb_check) + _devices_line(df) \
        + _explain_method_notes(df) + _device_notes(df)
    (out / "report.md").write_text("\n".join(md) + "\n")
    return out / "report.md"


def main(argv: Optional[list[str]] = None) -> int:
    """The command line: ``SWEEP_DIR [report.KEY=VALUE ...]``; prints where the report went."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if args else 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sweep = Path(args[0])
    rc = parse_overrides(args[1:])
    try:
        path = build_report(sweep, rc)
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = path.parent
    df = pd.read_csv(out / "results.csv", usecols=["state"]) if (out / "results.csv").stat().st_size else None
    counts = df["state"].value_counts().to_dict() if df is not None else {}
    print(f"report: {path}\ntable:  {out / 'results.csv'}\nfigures: {out / 'figures'}"
          + (f"\nmaps:   {out / 'maps'}" if (out / "maps").is_dir() else "")
          + "\ncells:  " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0
