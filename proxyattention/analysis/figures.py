"""The report's matplotlib figures: proxy vs baseline bars, accuracy against each proxy
hyperparameter, validation-accuracy learning curves with the proxy steps marked, a search's optimisation
history (:func:`figure_history`) and a two-objective search's Pareto front (:func:`pareto_front` computes
it).

matplotlib is imported (with the Agg backend) only when a figure is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from launcher.fileio import read_json
from proxyattention.schedule import parse_schedule

MAX_PANELS = 12  # dataset/model panels in the learning-curve figure
MAX_CURVES = 6  # proxy configurations per learning-curve figure (best by final validation accuracy)


def _plt() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(plt: Any, n: int, width: float = 4.2, height: float = 3.2) -> tuple[Any, list[Any]]:
    """A figure of ``n`` panels, up to 3 a row. Margins are fixed (tight_layout measures every text
    and costs seconds on large figures); legends sit at a fixed place for the same reason."""
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), dpi=100, squeeze=False)
    fig.subplots_adjust(left=0.09 if cols > 1 else 0.14, right=0.98, bottom=0.14 / rows + 0.04,
                        top=1 - 0.1 / rows, wspace=0.28, hspace=0.45)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    for ax in flat:
        ax.spines[["top", "right"]].set_visible(False)
    return fig, flat[:n]


def figure_bars(rows: pd.DataFrame, path: Path, metric: str) -> Optional[Path]:
    """Grouped bars per dataset/model: baseline, proxy (all configurations), proxy (best), ± std."""
    if rows.empty:
        return None
    plt = _plt()
    series = ["baseline", "proxy (all)", "proxy (best)"]
    colours = ["#7f7f7f", "#1f77b4", "#ff7f0e"]
    x = np.arange(len(rows))
    width = 0.26
    fig, (ax,) = _panels(plt, 1, width=max(4.5, 1.5 * len(rows) + 2), height=3.6)
    fig.subplots_adjust(top=0.86, bottom=0.16)
    for i, (name, colour) in enumerate(zip(series, colours)):
        means = [v[0] for v in rows[name]]
        stds = [0 if math.isnan(v[1]) else v[1] for v in rows[name]]
        ax.bar(x + (i - 1) * width, means, width, yerr=stds, capsize=3, label=name, color=colour)
    ax.set_xticks(x, [f"{d}\n{m}" for d, m in zip(rows["dataset"], rows["model"])])
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    lo = np.nanmin([v[0] - (0 if math.isnan(v[1]) else v[1]) for s in series for v in rows[s]] + [1.0])
    if metric.endswith("acc"):
        ax.set_ylim(max(0.0, lo - 0.1), 1.0)
    ax.legend(frameon=False, fontsize=8, ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.savefig(path)
    plt.close(fig)
    return path


def figure_hyperparameters(df: pd.DataFrame, params: Sequence[str], path: Path, metric: str) -> list[str]:
    """Accuracy against each proxy hyperparameter the sweep varies (one panel each), a line per
    dataset/model, its baseline dashed. Returns the parameters drawn."""
    proxy = df[(df["state"] == "DONE") & (df["role"] == "proxy")]
    drawn = [p for p in params if not proxy.empty and proxy[p].nunique() >= 2]
    if not drawn:
        return []
    plt = _plt()
    fig, axes = _panels(plt, len(drawn))
    base = df[(df["state"] == "DONE") & (df["role"] == "baseline")]
    base_means = base.groupby(["dataset.name", "model.name"])[metric].mean()
    for ax, param in zip(axes, drawn):
        for (ds, model), g in proxy.groupby(["dataset.name", "model.name"]):
            stats = g.groupby(param)[metric].agg(["mean", "std"]).sort_index()
            line = ax.errorbar(stats.index.astype(float), stats["mean"], yerr=stats["std"].fillna(0),
                               marker="o", ms=3, capsize=2, label=f"{ds} / {model}")
            if (ds, model) in base_means.index:
                ax.axhline(base_means[(ds, model)], ls="--", lw=1, color=line[0].get_color())
        ax.set_xlabel(param)
        ax.set_ylabel(f"{metric} (mean ± std)")
    axes[0].set_title("dashed: baseline (no proxy)", fontsize=8)
    axes[0].legend(frameon=False, fontsize=7, loc="lower right")
    fig.savefig(path)
    plt.close(fig)
    return drawn


def figure_search(df: pd.DataFrame, keys: Sequence[str], path: Path, objective: str,
                  minimize: bool = False) -> list[str]:
    """An adaptive sweep's trials: ``objective`` of each DONE proxy cell against each searched key (one
    panel each), the best trial ringed (the lowest with ``minimize``), the paired baselines' mean dashed.
    Returns the keys drawn."""
    proxy = df[(df["state"] == "DONE") & (df["role"] == "proxy")]
    drawn = [k for k in keys if k in proxy and objective in proxy and proxy[k].nunique() >= 2]
    if not drawn:
        return []
    plt = _plt()
    fig, axes = _panels(plt, len(drawn))
    base = df[(df["state"] == "DONE") & (df["role"] == "baseline")]
    y = proxy[objective].astype(float)
    best = y.idxmin() if minimize else y.idxmax()
    for ax, key in zip(axes, drawn):
        x = proxy[key].astype(float)
        ax.scatter(x, y, s=18, color="#1f77b4")
        ax.scatter([x[best]], [y[best]], s=80, facecolors="none", edgecolors="#ff7f0e", linewidths=1.5)
        if objective in base and not base.empty:
            ax.axhline(float(base[objective].mean()), ls="--", lw=1, color="#7f7f7f")
        ax.set_xlabel(key)
        ax.set_ylabel(objective)
    axes[0].set_title("one point per trial; ringed: best; dashed: baseline", fontsize=8)
    fig.savefig(path)
    plt.close(fig)
    return drawn


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[str]) -> list[int]:
    """Indices (ascending) of the Pareto-optimal points: those no other point dominates. ``a`` dominates
    ``b`` when it is at least as good in every objective and better in one, each objective read by its
    direction (``maximize`` | ``minimize``). Equal points do not dominate each other: all stay on the front.
    A point with a NaN (or missing) value is never on it and dominates nothing."""
    signs = []
    for d in directions:
        d = str(d).lower()
        if d not in ("maximize", "minimize"):
            raise ValueError(f"direction {d!r} is not maximize or minimize")
        signs.append(1.0 if d == "maximize" else -1.0)
    sign = np.array(signs)
    vals = np.array([[np.nan if v is None else float(v) for v in p] for p in points], dtype=float)
    if vals.size == 0:
        return []
    if vals.ndim != 2 or vals.shape[1] != len(signs):
        raise ValueError(f"each point needs {len(signs)} values, one per direction")
    ok = ~np.isnan(vals).any(axis=1)
    good = vals * sign  # higher is better in every column
    front = []
    for i in np.flatnonzero(ok):
        others = good[ok]
        dominated = ((others >= good[i]).all(axis=1) & (others > good[i]).any(axis=1)).any()
        if not dominated:
            front.append(int(i))
    return front


def figure_pareto(values: Sequence[Sequence[float]], front: Sequence[int], names: Sequence[str],
                  directions: Sequence[str], path: Path, labels: Optional[Sequence[str]] = None) -> bool:
    """A two-objective study: every trial's two values as a point, the Pareto-optimal ones (``front``,
    indices into ``values``) highlighted, labelled (``labels``, e.g. trial numbers) and joined in order
    of the first objective. Returns False (nothing drawn) without a point to draw."""
    pts = np.array([[float(v) for v in p] for p in values], dtype=float).reshape(-1, 2)
    ok = ~np.isnan(pts).any(axis=1)
    if not ok.any():
        return False
    plt = _plt()
    fig, axes = _panels(plt, 1, width=5.6, height=4.2)
    ax = axes[0]
    ax.scatter(pts[ok, 0], pts[ok, 1], s=18, color="#1f77b4", label="trial")
    on = sorted(front, key=lambda i: (pts[i, 0], pts[i, 1]))
    if on:
        ax.plot(pts[on, 0], pts[on, 1], "-o", color="#d62728", ms=7, lw=1.2, label="Pareto front")
        if labels is not None:  # equal points share one label: "#1, #2"
            at: dict[tuple[float, float], list[str]] = {}
            for i in on:
                at.setdefault((pts[i, 0], pts[i, 1]), []).append(str(labels[i]))
            for (x, y), names_here in at.items():
                ax.annotate(", ".join(names_here), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    arrow = {"maximize": "higher is better", "minimize": "lower is better"}
    ax.set_xlabel(f"{names[0]} ({arrow.get(str(directions[0]).lower(), directions[0])})")
    ax.set_ylabel(f"{names[1]} ({arrow.get(str(directions[1]).lower(), directions[1])})")
    ax.set_title("one point per COMPLETE trial; red: Pareto-optimal", fontsize=8)
    ax.legend(loc="best", fontsize=7)
    fig.savefig(path)
    plt.close(fig)
    return True


def _histories(rows: pd.DataFrame) -> dict[str, list[dict]]:
    """cell_id → the per-epoch ``history`` of its ``result.json``."""
    out = {}
    for cid, rp in zip(rows["cell_id"], rows.get("result_path", pd.Series([None] * len(rows)))):
        if isinstance(rp, str):
            d = read_json(Path(rp))
            if d:
                out[cid] = d.get("history", [])
    return out


def _curve_label(label: str, ds: str, model: str) -> str:
    """A configuration's label without the panel's dataset and model, cut to 70 characters."""
    label = " ".join(w for w in label.split() if w not in (f"dataset={ds}", f"model={model}"))
    return label if len(label) < 70 else label[:67] + "…"


def _draw_curve(ax: Any, g: pd.DataFrame, hist: dict[str, list[dict]], label: str) -> set[float]:
    """One configuration's mean val/acc over its seeds with a ±std band; returns its proxy steps."""
    curves = [pd.Series({h["epoch"]: h["val/acc"] for h in hist.get(c, [])}) for c in g["cell_id"]]
    curves = [c for c in curves if len(c)]
    if not curves:
        return set()
    table = pd.concat(curves, axis=1)
    mean, std = table.mean(axis=1), table.std(axis=1).fillna(0)
    is_base = g["role"].iloc[0] == "baseline"
    line, = ax.plot(mean.index, mean.values, color="black" if is_base else None, marker=".",
                    lw=2 if is_base else 1.2, label=f"{label} (n={len(curves)})")
    ax.fill_between(mean.index, mean - std, mean + std, alpha=0.15, color=line.get_color())
    if is_base:
        return set()
    p_trains = bool(g["proxy.p_trains"].iloc[0]) if "proxy.p_trains" in g else False
    return {e + 0.5 for e in parse_schedule(str(g["proxy.schedule"].iloc[0]), p_trains=p_trains).proxy_after}


def _curves_panel(ax: Any, here: pd.DataFrame, ds: str, model: str, labels: dict[str, str],
                  select_on: str = "val/acc") -> None:
    """The panel of one dataset/model: its baseline and its MAX_CURVES best proxy configurations by the
    mean of ``select_on`` over their seeds (the report's choice of "best")."""
    proxy = here[here["role"] == "proxy"]
    best = list(proxy.groupby("config_id")[select_on].mean().sort_values(ascending=False, kind="stable")
                .index[:MAX_CURVES])
    chosen = list(here.loc[here["role"] == "baseline", "config_id"].unique()) + best
    hist = _histories(here[here["config_id"].isin(chosen)])
    steps: set[float] = set()
    for config_id in chosen:
        label = _curve_label(labels.get(config_id, config_id), ds, model)
        steps |= _draw_curve(ax, here[here["config_id"] == config_id], hist, label)
    for s in sorted(steps):
        ax.axvline(s, ls=":", lw=1, color="#d62728")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch (dotted: proxy steps)")
    ax.set_ylabel("val/acc")
    ax.set_title(f"{ds} / {model}", fontsize=9)
    if ax.get_legend_handles_labels()[0]:  # cells without a history draw no curve
        ax.legend(frameon=False, fontsize=6, loc="lower right")


def figure_curves(df: pd.DataFrame, pairs: Sequence[tuple[str, str]], labels: dict[str, str],
                  path: Path, select_on: str = "val/acc") -> list[tuple[str, str]]:
    """Validation accuracy per epoch, one panel per dataset/model: the baseline (black) and the
    MAX_CURVES proxy configurations with the highest mean ``select_on`` (final validation accuracy, as
    the report's "best"), mean over seeds with a ±std band; dotted lines mark proxy steps. Returns the
    (dataset, model) panels drawn."""
    done = df[(df["state"] == "DONE")]
    if done.empty or select_on not in done:
        return []
    pairs = list(pairs)[:MAX_PANELS]
    plt = _plt()
    fig, axes = _panels(plt, len(pairs), width=5.2, height=3.4)
    for ax, (ds, model) in zip(axes, pairs):
        here = done[(done["dataset.name"].astype(str) == ds) & (done["model.name"].astype(str) == model)]
        _curves_panel(ax, here, ds, model, labels, select_on)
    fig.savefig(path)
    plt.close(fig)
    return pairs


def running_best(values: Sequence[float], minimize: bool = False) -> list[float]:
    """The best value so far at each position (NaN ones skipped; NaN until the first value)."""
    out, best = [], math.nan
    for v in values:
        if v is not None and not math.isnan(v):
            best = v if math.isnan(best) else (min(best, v) if minimize else max(best, v))
        out.append(best)
    return out


def figure_history(trials: Sequence[dict], path: Path, objective: str, minimize: bool = False) -> bool:
    """A search's optimisation history: ``objective`` of each COMPLETE trial against its trial number, the
    running best as a step line (the lowest so far with ``minimize``), PRUNED trials at their last reported
    value (grey triangles), and PRUNED trials without one and FAIL trials as marks along the bottom.
    ``trials``: ``[{"number", "state", "value", "last"}]`` (``last``: a PRUNED trial's last intermediate
    value or None). Returns False (nothing drawn) without a COMPLETE trial."""
    trials = sorted(trials, key=lambda t: t["number"])
    complete = [t for t in trials if t["state"] == "COMPLETE" and t.get("value") is not None
                and not math.isnan(t["value"])]
    if not complete:
        return False
    plt = _plt()
    fig, axes = _panels(plt, 1, width=6.0, height=3.8)
    ax = axes[0]
    x = [t["number"] for t in complete]
    y = [float(t["value"]) for t in complete]
    ax.scatter(x, y, s=20, color="#1f77b4", label="COMPLETE trial", zorder=3)
    best = running_best(y, minimize)
    ax.step(x, best, where="post", color="#ff7f0e", lw=1.5, label=f"best so far ({'min' if minimize else 'max'})")
    pruned = [t for t in trials if t["state"] == "PRUNED" and t.get("last") is not None]
    if pruned:
        ax.scatter([t["number"] for t in pruned], [float(t["last"]) for t in pruned], s=24, marker="v",
                   color="#7f7f7f", label="PRUNED (last reported value)", zorder=3)
    bottom = [t for t in trials if t["state"] == "FAIL" or (t["state"] == "PRUNED" and t.get("last") is None)]
    if bottom:
        import matplotlib.transforms as mtransforms

        low = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
        for state, marker, colour in (("FAIL", "x", "#d62728"), ("PRUNED", "v", "#7f7f7f")):
            here = [t["number"] for t in bottom if t["state"] == state]
            if here:
                ax.scatter(here, [0.03] * len(here), transform=low, marker=marker, s=30, color=colour,
                           label=f"{state} (no value)", clip_on=False, zorder=3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("trial number")
    ax.set_ylabel(f"{objective} ({'lower' if minimize else 'higher'} is better)")
    ax.set_title("optimisation history", fontsize=9)
    ax.legend(frameon=False, fontsize=7, loc="best")
    fig.savefig(path)
    plt.close(fig)
    return True
