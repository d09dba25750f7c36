"""Attention-map grids: the same test images under a baseline's and a proxy model's CAMs.

One PNG per proxy configuration: a row per image — the image (object outline where the dataset has
masks) | baseline CAM | proxy CAM, captioned with the predicted class and its probability. The maps are
computed with a CAM method other than the one the proxy model was trained with. torch and the model code
are imported only when a grid is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from launcher.fileio import CONFIG, RESULT, read_json
from proxyattention.paths import CHECKPOINT

TILE_MIN = 96  # attention-map tiles are upscaled (nearest) to at least this many pixels
HEADER_H, CAPTION_H, PAD = 18, 14, 4


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
    """The side of one tile: the image size times the smallest factor reaching TILE_MIN."""
    return image_size * max(1, math.ceil(TILE_MIN / image_size))


def _overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """(H, W, 3) float [0, 1] image and (H, W) map → the map in the jet colours over the image."""
    from matplotlib import colormaps

    heat = colormaps["jet"](cam)[..., :3]
    return 0.5 * image + 0.5 * heat


def _outlined(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A copy of ``image`` with the border of the (H, W) bool ``mask`` drawn in green."""
    img = image.copy()
    inner = mask.copy()
    inner[1:-1, 1:-1] = (mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2]
                         & mask[1:-1, 2:])
    img[mask & ~inner] = (0.0, 1.0, 0.0)
    return img


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
    canvas = Image.new("RGB", grid_size(k, h), "white")
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(titles):
        draw.text((PAD + col * (tile + PAD), 3), title, fill="black")
    for i in range(k):
        img = images[i] if masks is None else _outlined(images[i], masks[i])
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


def _check_same_data(rows: tuple[pd.Series, ...], samples: Any, split: Any) -> None:
    """Raise when a cell ran on another dataset or split than the one loaded now."""
    for row in rows:
        data = (read_json(Path(row["dir"]) / RESULT) or {}).get("data") or {}
        if data.get("fingerprint") not in (None, samples.fingerprint) or data.get("split") not in (
                None, split.fingerprint):
            raise RuntimeError(f"the dataset or split of cell {row['cell_id']} changed since it ran "
                               f"(data {data.get('fingerprint')} → {samples.fingerprint}); its model cannot "
                               "be shown on the same test images. Rerun the cell (force) to refresh it")


def _cams(row: pd.Series, cfg: Any, classes: int, x: Any, y: Any, method: str,
          device: Any) -> tuple[np.ndarray, Any]:
    """The CAMs (K, H, W) of one cell's checkpoint on images ``x`` for labels ``y``, and its probabilities."""
    import torch

    from proxyattention.cam import compute_cams
    from proxyattention.data import normalize
    from proxyattention.models import build_model, find_target_layer

    model = build_model(cfg.model, classes, cfg.dataset.image_size)
    state = torch.load(Path(row["dir"]) / CHECKPOINT, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    target = find_target_layer(model, cfg.dataset.image_size, cfg.model.target_layer)
    inp = normalize(x).to(device)
    with torch.no_grad():
        prob = model(inp).softmax(1)
    return compute_cams(model, inp, y.to(device), method, target).cpu().numpy(), prob.cpu()


def _captions(names: list[str], y: Any, preds: list[Any]) -> list[tuple[str, str, str]]:
    """Per image: its true class, then each model's predicted class and probability (x: wrong)."""
    captions = []
    for i in range(len(y)):
        cap = [f"true {names[int(y[i])]}"]
        for p in preds:
            c = int(p[i].argmax())
            cap.append(f"{names[c]} {float(p[i, c]):.2f}{'' if c == int(y[i]) else ' x'}")
        captions.append((cap[0], cap[1], cap[2]))
    return captions


def attention_grid(proxy_row: pd.Series, base_row: pd.Series, path: Path, *, images: int,
                   method: str, device: str = "cpu") -> str:
    """Render the grid of one proxy cell and its baseline on ``images`` test images; returns the CAM
    method used (``method``, or another where the proxy model was trained with it)."""
    import torch
    from omegaconf import OmegaConf

    from proxyattention.config import to_trial_config
    from proxyattention.data import to_float
    from proxyattention.explain import choose_images, masks_at

    cfg = to_trial_config(OmegaConf.load(Path(proxy_row["dir"]) / CONFIG))
    seed = int(cfg.train.seed)
    samples, split, bank = _Loaded.get(cfg, seed)
    _check_same_data((proxy_row, base_row), samples, split)
    idx = choose_images(torch.from_numpy(split.test), images, seed)
    x = to_float(bank.get(idx))
    y = bank.labels[idx]
    used = evaluation_method(cfg.method.name, method)
    maps, preds = zip(*(_cams(row, cfg, len(samples.classes), x, y, used, torch.device(device))
                        for row in (base_row, proxy_row)))
    masks = None
    if getattr(samples, "masks", None) is not None:
        masks = masks_at(samples.masks, idx, x.shape[-2:]).numpy()
    render_grid(x.permute(0, 2, 3, 1).numpy(), maps[0], maps[1], _captions(samples.classes, y, list(preds)),
                ("image", "baseline", "proxy"), path, masks)
    return used


def map_pairs(df: pd.DataFrame, limit: int) -> list[tuple[pd.Series, pd.Series]]:
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
