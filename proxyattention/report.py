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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from proxyattention import results as R
from proxyattention.config import CAM_METHODS
from proxyattention.schedule import parse_schedule

log = logging.getLogger(__name__)

BAR_FIGURE = "bars_test_acc.png"  # the figure the README shows: keep this name stable
HYPERPARAMETERS = ("proxy.threshold", "proxy.weight", "proxy.subset")
MAX_WAITING = 40  # RUNNING / PENDING cells listed by name (failed cells are always all listed)
MAX_PANELS = 12  # dataset/model panels in the learning-curve figure
MAX_CURVES = 6  # proxy configurations per learning-curve figure (best by validation accuracy)
TILE_MIN = 96  # attention-map tiles are upscaled (nearest) to at least this many pixels
HEADER_H, CAPTION_H, PAD = 18, 14, 4


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


# ------------------------------------------------------------------------------------------ tables

def _iv(mean: float, std: float, n: int) -> str:
    return R.fmt_mean(mean, std, n)


def _states_section(df: pd.DataFrame, labels: dict[str, str]) -> list[str]:
    counts = df["state"].value_counts()
    parts = [f"{counts[s]} {s}" for s in R.STATES if s in counts]
    other = [f"{v} {k}" for k, v in counts.items() if k not in R.STATES]
    out = [f"**{len(df)} cells:** " + ", ".join(parts + other) + "."]
    unfinished = df[df["state"] != "DONE"]
    if unfinished.empty:
        out.append("\nEvery cell is DONE.")
        return out
    out.append("\n## Cells not done\n")
    out.append("These cells have no result and are left out of every number below.\n")
    rows = []
    order = {s: i for i, s in enumerate(("FAILED", "TIMEOUT", "CANCELLED", "RUNNING", "PENDING"))}
    unfinished = unfinished.sort_values(["state", "cell_id"], key=lambda c: c.map(order).fillna(-1)
                                        if c.name == "state" else c)
    failed = unfinished[unfinished["state"].isin(["FAILED", "TIMEOUT", "CANCELLED"])]
    # Every failed cell is listed; of the cells still to run, the first MAX_WAITING.
    waiting = unfinished.drop(failed.index)
    more = max(0, len(waiting) - MAX_WAITING)
    unfinished = pd.concat([failed, waiting.head(MAX_WAITING)])
    for _, r in unfinished.iterrows():
        err = r.get("error")
        age = r.get("heartbeat_age_s")
        if r["state"] == "RUNNING" and isinstance(age, float) and not math.isnan(age):
            err = f"last heartbeat {age:.0f} s ago"
        rows.append([r["cell_id"], r["state"], labels.get(r["config_id"], ""), r["train.seed"],
                     err if isinstance(err, str) and err else "–"])
    out.append(R.markdown_table(rows, ["cell", "state", "configuration", "seed", "error (last line)"]))
    if more:
        out.append(f"\n… and {more} more cells RUNNING or PENDING (all in results.csv).")
    return out


def _table_dataset_model(df: pd.DataFrame, metric: str, level: float) -> tuple[str, pd.DataFrame]:
    """Thesis Table 8.1: per dataset × model, baseline vs proxy (all configurations; the best one)."""
    by = ["dataset.name", "model.name"]
    base = R.baseline_summary(df, by, metric)
    pooled = R.grouped_paired(df, by, metric, level)
    summary = R.paired_summary(df, metric, level)
    proxy = df[(df["state"] == "DONE") & (df["role"] == "proxy")]
    val = proxy.groupby("config_id")["val/acc_best"].mean() if "val/acc_best" in proxy else pd.Series()
    keys = sorted(set(map(tuple, df.loc[df["state"] == "DONE", by].astype(str).values.tolist())))
    rows, fig_rows = [], []
    for ds, model in keys:
        b = base[(base["dataset.name"].astype(str) == ds) & (base["model.name"].astype(str) == model)] \
            if not base.empty else base
        p = pooled[(pooled["dataset.name"].astype(str) == ds) & (pooled["model.name"].astype(str) == model)] \
            if not pooled.empty else pooled
        here = proxy[(proxy["dataset.name"].astype(str) == ds) & (proxy["model.name"].astype(str) == model)]
        best_cfg = val[val.index.isin(here["config_id"])].idxmax() if not here.empty and len(val) else None
        best = summary[summary["config_id"] == best_cfg] if best_cfg is not None else summary.iloc[0:0]
        bm = b.iloc[0] if len(b) else None
        pm = p.iloc[0] if len(p) else None
        bs = best.iloc[0] if len(best) else None
        best_txt = _iv(bs.proxy_mean, bs.proxy_std, bs.seeds) if bs is not None else "–"
        rows.append([
            ds, model,
            _iv(bm["mean"], bm["std"], bm["n"]) if bm is not None else "no baseline",
            _iv(pm.acc_mean, pm.acc_std, pm.cells) if pm is not None else "–",
            R.fmt_diff(pm.diff_mean, pm.ci_lo, pm.ci_hi) if pm is not None else "–",
            best_txt,
            R.fmt_diff(bs.diff_mean, bs.ci_lo, bs.ci_hi) if bs is not None else "–",
            "; ".join(x for x in ((f"all: {pm.note}" if pm is not None and pm.note else ""),
                                  (f"best: {bs.note}" if bs is not None and bs.note else "")) if x) or "",
        ])
        fig_rows.append({"dataset": ds, "model": model,
                         "baseline": (bm["mean"], bm["std"]) if bm is not None else (math.nan, math.nan),
                         "proxy (all)": (pm.acc_mean, pm.acc_std) if pm is not None else (math.nan, math.nan),
                         "proxy (best)": (bs.proxy_mean, bs.proxy_std) if bs is not None else (math.nan, math.nan)})
    table = R.markdown_table(rows, ["dataset", "model", "baseline", "proxy (all configs)",
                                    "Δ all, per seed [95% CI]", "proxy (best by val acc)",
                                    "Δ best [95% CI]", "note"])
    return table, pd.DataFrame(fig_rows)


def _table_by(df: pd.DataFrame, param: str, metric: str, level: float) -> str:
    """Thesis Tables 8.2–8.4: proxy cells by one hyperparameter, per dataset × model."""
    by = ["dataset.name", "model.name", param]
    g = R.grouped_paired(df, by, metric, level)
    if g.empty:
        return "_No finished proxy cells._"
    rows = [[r["dataset.name"], r["model.name"], r[param], _iv(r.acc_mean, r.acc_std, r.cells),
             R.fmt_diff(r.diff_mean, r.ci_lo, r.ci_hi), r.paired_seeds, r.note]
            for _, r in g.iterrows()]
    if param == "proxy.schedule":  # the baselines are the schedules without p
        b = R.baseline_summary(df, ["dataset.name", "model.name", "proxy.schedule"], metric)
        rows += [[r["dataset.name"], r["model.name"], f"{r['proxy.schedule']} (baseline)",
                  _iv(r["mean"], r["std"], r["n"]), "", "", ""] for _, r in b.iterrows()]
        rows.sort(key=lambda x: (str(x[0]), str(x[1]), str(x[2])))
    return R.markdown_table(rows, ["dataset", "model", param.split(".")[-1], f"{metric} mean ± std",
                                   "Δ vs baseline, per seed [95% CI]", "paired seeds", "note"])


def _table_configs(df: pd.DataFrame, labels: dict[str, str], metric: str, level: float) -> str:
    s = R.paired_summary(df, metric, level)
    if s.empty:
        return "_No finished proxy cells._"
    s = s.assign(label=[labels.get(c, c) for c in s["config_id"]]).sort_values("label")
    rows = [[r.label, _iv(r.proxy_mean, r.proxy_std, r.seeds), _iv(r.baseline_mean, r.baseline_std, r.paired),
             R.fmt_diff(r.diff_mean, r.ci_lo, r.ci_hi),
             "–" if math.isnan(r.diff_std) else f"{r.diff_std:.3f}", r.note or "ok"]
            for r in s.itertuples()]
    return R.markdown_table(rows, ["configuration", "proxy", "baseline (same seeds)", "Δ [95% CI]",
                                   "Δ std", "note"])


def _table_explain(df: pd.DataFrame, labels: dict[str, str], level: float) -> Optional[str]:
    metrics = [m for m in R.EXPLAIN_METRICS if m in df.columns and df[m].notna().any()]
    if not metrics:
        return None
    header = ["configuration"]
    for m in metrics:
        arrow = "↑" if R.METRIC_DIRECTIONS[m] else "↓"
        header += [f"{m.split('/')[1]} {arrow} baseline → proxy", "Δ [95% CI]"]
    summaries = {m: R.paired_summary(df, m, level).set_index("config_id") for m in metrics}
    config_ids = sorted(summaries[metrics[0]].index, key=lambda c: labels.get(c, c))
    rows = []
    notes = set()
    for c in config_ids:
        row = [labels.get(c, c)]
        for m in metrics:
            s = summaries[m].loc[c] if c in summaries[m].index else None
            if s is None or s["paired"] == 0:
                row += ["–", "–"]
                continue
            diff = R.fmt_diff(s.diff_mean, s.ci_lo, s.ci_hi, digits=3)
            row += [f"{s.baseline_mean:.3g} → {s.proxy_mean:.3g}",
                    diff + (" (contains 0)" if s.paired >= 2 and s.contains_zero else "")]
            note = R.notes_for(None, int(s.no_baseline), int(s.paired))
            if note:
                notes.add(f"{labels.get(c, c)}: {note}")
        rows.append(row)
    text = R.markdown_table(rows, header)
    if notes:
        text += "\n\nCaveats: " + " · ".join(sorted(notes))
    return text


def _explain_method_notes(df: pd.DataFrame) -> list[str]:
    if "explain.method" not in df.columns:
        return []
    same = df[(df["role"] == "proxy") & (df["explain.method"] == df["method.name"])]
    if same.empty:
        return []
    return [f"- {len(same)} proxy cell(s) were judged with their own training method "
            f"({', '.join(sorted(same['method.name'].unique()))}); their explainability numbers favour "
            "the proxy model (set explain.method to another method)."]


# ------------------------------------------------------------------------------------------ figures

def _plt() -> Any:
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


def _histories(rows: pd.DataFrame) -> dict[str, list[dict]]:
    out = {}
    for cid, rp in zip(rows["cell_id"], rows.get("result_path", pd.Series([None] * len(rows)))):
        if isinstance(rp, str):
            d = R.read_json(Path(rp))
            if d:
                out[cid] = d.get("history", [])
    return out


def figure_curves(df: pd.DataFrame, pairs: Sequence[tuple[str, str]], labels: dict[str, str],
                  path: Path) -> list[tuple[str, str]]:
    """Validation accuracy per epoch, one panel per dataset/model: the baseline (black) and the
    MAX_CURVES proxy configurations with the best validation accuracy, mean over seeds with a ±std
    band; dotted lines mark proxy steps. Returns the (dataset, model) panels drawn."""
    done = df[(df["state"] == "DONE")]
    if done.empty or "val/acc_best" not in done:
        return []
    pairs = list(pairs)[:MAX_PANELS]
    plt = _plt()
    fig, axes = _panels(plt, len(pairs), width=5.2, height=3.4)
    for ax, (ds, model) in zip(axes, pairs):
        here = done[(done["dataset.name"].astype(str) == ds) & (done["model.name"].astype(str) == model)]
        proxy = here[here["role"] == "proxy"]
        best = list(proxy.groupby("config_id")["val/acc_best"].mean().sort_values(ascending=False)
                    .index[:MAX_CURVES])
        chosen = list(here.loc[here["role"] == "baseline", "config_id"].unique()) + best
        hist = _histories(here[here["config_id"].isin(chosen)])
        steps: set[float] = set()
        for config_id in chosen:
            g = here[here["config_id"] == config_id]
            curves = [pd.Series({h["epoch"]: h["val/acc"] for h in hist.get(c, [])}) for c in g["cell_id"]]
            curves = [c for c in curves if len(c)]
            if not curves:
                continue
            table = pd.concat(curves, axis=1)
            mean, std = table.mean(axis=1), table.std(axis=1).fillna(0)
            is_base = g["role"].iloc[0] == "baseline"
            words = labels.get(config_id, config_id).split()
            label = " ".join(w for w in words if w not in (f"dataset={ds}", f"model={model}"))
            label = label if len(label) < 70 else label[:67] + "…"
            line, = ax.plot(mean.index, mean.values, color="black" if is_base else None, marker=".",
                            lw=2 if is_base else 1.2, label=f"{label} (n={len(curves)})")
            ax.fill_between(mean.index, mean - std, mean + std, alpha=0.15, color=line.get_color())
            if not is_base:
                steps.update(e + 0.5 for e in parse_schedule(str(g["proxy.schedule"].iloc[0])).proxy_after)
        for s in sorted(steps):
            ax.axvline(s, ls=":", lw=1, color="#d62728")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("epoch (dotted: proxy steps)")
        ax.set_ylabel("val/acc")
        ax.set_title(f"{ds} / {model}", fontsize=9)
        ax.legend(frameon=False, fontsize=6, loc="lower right")
    fig.savefig(path)
    plt.close(fig)
    return pairs


# ------------------------------------------------------------------------------------ attention maps

def evaluation_method(train_method: str, preferred: str) -> str:
    """``preferred`` unless the model was trained with it; then the first of a fixed list that differs."""
    for m in (preferred, "eigengradcam", "gradcampp", "gradcam"):
        if m != train_method:
            return m
    return preferred


def grid_size(images: int, image_size: int) -> tuple[int, int]:
    """(width, height) in pixels of an attention-map grid of ``images`` rows."""
    tile = _tile(image_size)
    return 3 * tile + 4 * PAD, HEADER_H + images * (tile + CAPTION_H + PAD) + PAD


def _tile(image_size: int) -> int:
    return image_size * max(1, math.ceil(TILE_MIN / image_size))


def _overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """(H, W, 3) float [0, 1] image and (H, W) map → the map in the jet colours over the image."""
    from matplotlib import colormaps

    heat = colormaps["jet"](cam)[..., :3]
    return 0.5 * image + 0.5 * heat


def render_grid(images: np.ndarray, cams_a: np.ndarray, cams_b: np.ndarray,
                captions: list[tuple[str, str, str]],
                titles: tuple[str, str, str], path: Path, masks: Optional[np.ndarray] = None) -> Path:
    """A PNG: one row per image — image | baseline CAM | proxy CAM, a caption under each tile.

    images: (K, H, W, 3) float [0, 1]; cams_*: (K, H, W) float [0, 1]; masks: optional (K, H, W) bool
    object outlines drawn on the image column.
    """
    from PIL import Image, ImageDraw

    k, h = images.shape[0], images.shape[1]
    tile = _tile(h)
    scale = tile // h
    width, height = grid_size(k, h)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(titles):
        draw.text((PAD + col * (tile + PAD), 3), title, fill="black")
    for i in range(k):
        img = images[i].copy()
        if masks is not None:
            m = masks[i]
            inner = m.copy()
            inner[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
            img[m & ~inner] = (0.0, 1.0, 0.0)
        tiles = [img, _overlay(images[i], cams_a[i]), _overlay(images[i], cams_b[i])]
        y = HEADER_H + i * (tile + CAPTION_H + PAD)
        for col, t in enumerate(tiles):
            arr = np.clip(t * 255 + 0.5, 0, 255).astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
            canvas.paste(Image.fromarray(arr), (PAD + col * (tile + PAD), y))
        for col, text in enumerate(captions[i]):
            draw.text((PAD + col * (tile + PAD), y + tile + 1), text, fill="black")
    canvas.save(path)
    return path


class _Loaded:
    """Data and split of one (dataset, seed), loaded once for all the grids that need them."""

    cache: dict[str, Any] = {}

    @classmethod
    def get(cls, cfg: Any, seed: int) -> tuple[Any, Any, Any]:
        import torch

        from proxyattention.data import ImageBank, load_or_make_split, load_samples

        key = f"{sorted(cfg.dataset.items())}-{seed}"
        if key not in cls.cache:
            samples = load_samples(cfg.dataset)
            split = load_or_make_split(samples, cfg.dataset, seed)
            bank = ImageBank(samples, cfg.dataset.image_size, torch.device("cpu"), "no", 0, 0)
            cls.cache = {key: (samples, split, bank)}  # one at a time: datasets can be large
        return cls.cache[key]


def attention_grid(proxy_row: pd.Series, base_row: pd.Series, rc: ReportConfig, path: Path) -> str:
    """Render the grid of one proxy cell and its baseline; returns the CAM method used."""
    import torch
    from omegaconf import OmegaConf

    from proxyattention.cam import compute_cams
    from proxyattention.config import to_trial_config
    from proxyattention.data import normalize, to_float
    from proxyattention.explain import choose_images, masks_at
    from proxyattention.models import build_model, find_target_layer

    cfg = to_trial_config(OmegaConf.load(Path(proxy_row["dir"]) / "config.yaml"))
    seed = int(cfg.train.seed)
    samples, split, bank = _Loaded.get(cfg, seed)
    for row in (proxy_row, base_row):
        data = (R.read_json(Path(row["dir"]) / "result.json") or {}).get("data") or {}
        if data.get("fingerprint") not in (None, samples.fingerprint) or data.get("split") not in (None,
                                                                                           split.fingerprint):
            raise RuntimeError(f"the dataset or split of cell {row['cell_id']} changed since it ran "
                               f"(data {data.get('fingerprint')} → {samples.fingerprint}); its model cannot "
                               "be shown on the same test images. Rerun the cell (force) to refresh it")
    idx = choose_images(torch.from_numpy(split.test), rc.images, seed)
    x = to_float(bank.get(idx))
    y = bank.labels[idx]
    method = evaluation_method(cfg.method.name, rc.method)
    device = torch.device(rc.device)
    maps, preds = [], []
    for row in (base_row, proxy_row):
        model = build_model(cfg.model, len(samples.classes), cfg.dataset.image_size)
        state = torch.load(Path(row["dir"]) / "checkpoint.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        model.to(device).eval()
        target = find_target_layer(model, cfg.dataset.image_size, cfg.model.target_layer)
        inp = normalize(x).to(device)
        with torch.no_grad():
            prob = model(inp).softmax(1)
        maps.append(compute_cams(model, inp, y.to(device), method, target).cpu().numpy())
        preds.append(prob.cpu())
    names = samples.classes
    captions = []
    for i in range(len(idx)):
        cap = [f"true {names[int(y[i])]}"]
        for p in preds:
            c = int(p[i].argmax())
            cap.append(f"{names[c]} {float(p[i, c]):.2f}{'' if c == int(y[i]) else ' x'}")
        captions.append((cap[0], cap[1], cap[2]))
    masks = None
    if getattr(samples, "masks", None) is not None:
        masks = masks_at(samples.masks, idx, x.shape[-2:]).numpy()
    titles = ("image", "baseline", "proxy")
    render_grid(x.permute(0, 2, 3, 1).numpy(), maps[0], maps[1], captions, titles, path, masks)
    return method


def _map_pairs(df: pd.DataFrame, limit: int) -> list[tuple[pd.Series, pd.Series]]:
    """One (proxy cell, baseline cell) per proxy configuration: the lowest seed with both checkpoints."""
    done = df[(df["state"] == "DONE") & df["checkpoint"].notna()] if "checkpoint" in df else df.iloc[0:0]
    by_key = {k: r for k, (_, r) in zip(done["_key"], done.iterrows())}
    pairs = []
    proxy = done[done["role"] == "proxy"].sort_values(["config_id", "train.seed"])
    for _, g in proxy.groupby("config_id", sort=True):
        for _, r in g.iterrows():
            if r["baseline_id"] in by_key:
                pairs.append((r, by_key[r["baseline_id"]]))
                break
        if len(pairs) >= limit:
            break
    return pairs


# -------------------------------------------------------------------------------------------- build

def _tb_section(df: pd.DataFrame, limit: int) -> list[str]:
    done = df[(df["state"] == "DONE") & df["tb_dir"].notna()].sort_values("cell_id") \
        if "tb_dir" in df else df.iloc[0:0]
    if limit >= 0:
        done = done.head(limit)
    if done.empty:
        return ["- TensorBoard: no finished cell with a tb/ folder to check."]
    bad = {}
    for r in done.itertuples():
        problems = R.check_tensorboard(r.dir)
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


def build_report(sweep_dir: str | Path, rc: Optional[ReportConfig] = None) -> Path:
    """Write the report folder of a sweep; returns the path of ``report.md``."""
    rc = rc or ReportConfig()
    sweep = Path(sweep_dir)
    out = Path(rc.out) if rc.out else sweep / "report"
    (out / "figures").mkdir(parents=True, exist_ok=True)
    df = R.load_results(sweep)
    R.results_csv_frame(df).to_csv(out / "results.csv", index=False)
    metric = rc.metric
    md = [f"# Proxy Attention report — `{sweep}`", ""]
    if df.empty:
        md.append("No cells yet (no cells/*/config.yaml).")
        (out / "report.md").write_text("\n".join(md) + "\n")
        return out / "report.md"
    labels = R.config_labels(df)
    md += _states_section(df, labels)
    problems = df[df["problem"].astype(bool)] if "problem" in df else df.iloc[0:0]
    if not problems.empty:
        md += ["", "## Problems", ""] + [f"- {r.cell_id}: {r.problem}" for r in problems.itertuples()]
    md += ["", f"Numbers are `{metric}` on each cell's held-out test split, as mean ± std (n = cells or "
               f"seeds). **Δ** is proxy − baseline of the *same seed* (same split, initial weights, data "
               f"order and epochs), with a {rc.level:.0%} Student-t interval over seeds. Notes flag a "
               f"missing baseline, fewer than {R.MIN_SEEDS} seeds, and intervals that contain 0 (no "
               f"evidence of a difference)."]
    if metric not in df.columns:
        md += ["", f"_No finished cell has `{metric}` yet._"]
    else:
        table, bar_rows = _table_dataset_model(df, metric, rc.level)
        md += ["", "## Test accuracy by dataset and model", "",
               "\"all configs\" pools every proxy configuration (Δ averaged per seed first); \"best\" is the "
               "configuration with the highest mean validation accuracy (chosen without the test set).", "",
               table]
        for param in ("proxy.schedule", *HYPERPARAMETERS):
            md += ["", f"## By {param.split('.')[-1]}", "", _table_by(df, param, metric, rc.level)]
        md += ["", "## Every proxy configuration, paired with its baseline", "",
               _table_configs(df, labels, metric, rc.level)]
        explain = _table_explain(df, labels, rc.level)
        if explain:
            md += ["", "## Explainability (test images)", "",
                   "Per configuration: baseline → proxy means and the paired Δ [95% CI]. AD: Average Drop "
                   "(lower is better), AI: Average Increase, AG: Average Gain, insertion (higher) and "
                   "deletion (lower) areas, pointing: share of CAM energy inside the object mask (higher). "
                   "Maps from each cell's `explain.method`.", "", explain]
        figs = []
        if figure_bars(bar_rows, out / "figures" / BAR_FIGURE, metric):
            figs.append((BAR_FIGURE, "proxy vs baseline per dataset/model"))
        name = f"{metric.replace('/', '_')}_vs_hyperparameters.png"
        drawn = figure_hyperparameters(df, HYPERPARAMETERS, out / "figures" / name, metric)
        if drawn:
            figs.append((name, f"{metric} against {', '.join(drawn)}"))
        pairs = sorted(set(map(tuple, df.loc[df["state"] == "DONE", ["dataset.name", "model.name"]]
                               .astype(str).values.tolist())))
        if figure_curves(df, pairs, labels, out / "figures" / "learning_curves.png"):
            figs.append(("learning_curves.png", "validation accuracy per epoch"))
            if len(pairs) > MAX_PANELS:
                md += ["", f"_Learning curves show the first {MAX_PANELS} of {len(pairs)} dataset/model "
                           "pairs._"]
        md += ["", "## Figures", ""] + [f"![{alt}](figures/{name})" for name, alt in figs]
    if rc.maps > 0:
        pairs = _map_pairs(df, rc.maps)
        if pairs:
            (out / "maps").mkdir(exist_ok=True)
            md += ["", "## Attention maps", "",
                   "The same test images for a proxy model and its baseline (same seed). Captions: predicted "
                   "class and its probability (x: wrong). Maps explain the true class.", ""]
            for prow, brow in pairs:
                name = f"maps/{prow['cell_id']}.png"
                try:
                    method = attention_grid(prow, brow, rc, out / name)
                except Exception as e:  # a broken checkpoint must not sink the whole report
                    log.warning("attention map of %s failed: %s", prow["cell_id"], e)
                    md.append(f"- {labels.get(prow['config_id'])}, seed {prow['train.seed']}: "
                              f"attention map failed ({type(e).__name__}: {e})")
                    continue
                note = "" if method == rc.method else f" ({rc.method} trained this model; judged with {method})"
                md += [f"**{labels.get(prow['config_id'])}**, seed {prow['train.seed']} — {method}{note}", "",
                       f"![attention maps]({name})", ""]
    md += ["", "## Checks", ""] + _tb_section(df, rc.tb_check) + _explain_method_notes(df)
    (out / "report.md").write_text("\n".join(md) + "\n")
    return out / "report.md"


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if args else 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sweep = Path(args[0])
    rc = parse_overrides(args[1:])
    try:
        path = build_report(sweep, rc)
    except R.ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = path.parent
    df = pd.read_csv(out / "results.csv", usecols=["state"]) if (out / "results.csv").stat().st_size else None
    counts = df["state"].value_counts().to_dict() if df is not None else {}
    print(f"report: {path}\ntable:  {out / 'results.csv'}\nfigures: {out / 'figures'}"
          + (f"\nmaps:   {out / 'maps'}" if (out / "maps").is_dir() else "")
          + "\ncells:  " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
