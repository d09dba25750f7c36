"""The synthetic ``shapes`` dataset: shapes on cluttered backgrounds, with ground-truth object masks.

Deterministic, rendered at ``dataset.image_size`` (no files, no network); the masks are the ground truth
for pointing-game metrics.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import numpy as np

from proxyattention.data.samples import DataError, Samples, content_hash

SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "ring")
SHAPES_PER_CLASS = 300
SHAPES_SEED = 20240601


@functools.lru_cache(maxsize=16)
def _lerp_weights(size: int, cells: int) -> np.ndarray:
    """(size, 4) weights that linearly interpolate a periodic 4-point lattice over ``cells`` cells."""
    u = np.arange(size) / size * cells
    i0 = np.floor(u).astype(int) % 4
    f = u - np.floor(u)
    w = np.zeros((size, 4))
    w[np.arange(size), i0] += 1 - f
    w[np.arange(size), (i0 + 1) % 4] += f
    return w


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1]: (yy, xx), each (size, size)."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size
    return yy, xx


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float in [0, 1]: colour value noise at three scales, stripes, speckle, strokes."""
    coarse = rng.uniform(0.15, 0.85, size=(3, 4, 4, 3))
    bg = np.zeros((size, size, 3))
    for octave, amp in zip(range(3), (0.5, 0.3, 0.2)):
        w = _lerp_weights(size, 2 ** (octave + 1))
        for ch in range(3):
            bg[..., ch] += amp * (w @ coarse[octave, :, :, ch] @ w.T)
    yy, xx = _grid(size)
    angle = rng.uniform(0, math.pi)
    freq = rng.uniform(3, 8)
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)))
    bg = bg * 0.8 + 0.2 * stripes[..., None] * rng.uniform(0.2, 1.0, size=3)
    bg += rng.normal(0, 0.05, size=bg.shape)  # pixel speckle
    # Distractor strokes: thin line segments in random colours, the same for every class.
    for _ in range(rng.integers(1, 4)):
        x0, y0, x1, y1 = rng.uniform(0, 1, size=4)
        t = np.clip(((xx - x0) * (x1 - x0) + (yy - y0) * (y1 - y0))
                    / max((x1 - x0) ** 2 + (y1 - y0) ** 2, 1e-6), 0, 1)
        d = np.hypot(xx - (x0 + t * (x1 - x0)), yy - (y0 + t * (y1 - y0)))
        bg[d < rng.uniform(0.01, 0.02)] = rng.uniform(0, 1, size=3)
    return np.clip(bg, 0, 1)


def _shape_mask(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) bool mask of one object of class ``kind``, random position, scale and rotation."""
    r = rng.uniform(0.25, 0.34)  # half-extent as a fraction of the image
    cx, cy = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = _grid(size)
    dx, dy = xx - cx, yy - cy
    u = (dx * math.cos(theta) + dy * math.sin(theta)) / r  # object coordinates, unit half-extent
    v = (-dx * math.sin(theta) + dy * math.cos(theta)) / r
    rad = np.hypot(u, v)
    if kind == "circle":
        return rad <= 1.0
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if kind == "triangle":  # equilateral, circumradius 1
        ang = np.arctan2(v, u)
        sector = 2 * math.pi / 3
        local = np.mod(ang + math.pi / 2, sector) - sector / 2
        return rad * np.cos(local) <= 0.5 + 1e-9
    if kind == "cross":
        bar = 0.3
        return ((np.abs(u) <= bar) & (np.abs(v) <= 1)) | ((np.abs(v) <= bar) & (np.abs(u) <= 1))
    if kind == "ring":
        return (rad <= 1.0) & (rad >= 0.55)
    raise ValueError(kind)


def _render_shape(index: int, size: int, num_classes: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Image ``index`` of the shapes dataset: ((size, size, 3) uint8, (size, size) bool mask, label).

    Every image has its own random stream (seeded by its index), so any subset renders alone.
    """
    label = index % num_classes
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([SHAPES_SEED, index])))
    bg = _background(rng, size)
    mask = _shape_mask(SHAPE_CLASSES[label], rng, size)
    colour = rng.uniform(0, 1, size=3)
    colour[rng.integers(3)] = rng.choice([0.05, 0.95])  # saturated in one channel: visible on the noise
    texture = 1 + rng.normal(0, 0.06, size=(size, size, 1))
    img = np.where(mask[..., None], np.clip(colour * texture, 0, 1), bg)
    return np.round(img * 255).astype(np.uint8), mask, label


def _shapes_num_classes(cfg: Any) -> int:
    n = cfg.num_classes if cfg.num_classes is not None else len(SHAPE_CLASSES)
    if not 2 <= n <= len(SHAPE_CLASSES):
        raise DataError(f"dataset.num_classes={n} for the shapes dataset must be 2..{len(SHAPE_CLASSES)}")
    return int(n)


def shape_masks(cfg: Any, indices: Optional[np.ndarray] = None) -> np.ndarray:
    """Ground-truth object masks of the shapes dataset: (len(indices), S, S) bool, S = dataset.image_size.

    ``indices`` are dataset indices (as in the split); None means all. The masks are pixel-aligned
    with the images the trial sees (rendered at the input size, so no resize comes between them).
    """
    n_cls = _shapes_num_classes(cfg)
    total = n_cls * SHAPES_PER_CLASS
    idx = np.arange(total) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= total):
        raise IndexError(f"shapes has {total} images; index out of range")
    size = int(cfg.image_size)
    out = np.zeros((len(idx), size, size), dtype=bool)
    for k, i in enumerate(idx):
        out[k] = _render_shape(int(i), size, n_cls)[1]
    return out


def load_shapes(cfg: Any) -> Samples:
    """Synthetic shapes on cluttered backgrounds: class = shape; rendered at ``dataset.image_size``.

    ``SHAPES_PER_CLASS`` images per class, deterministic (no files, no network). ``Samples.masks``
    holds each image's object mask, the ground truth for pointing-game metrics; :func:`shape_masks`
    renders the masks of any indices alone.
    """
    n_cls = _shapes_num_classes(cfg)
    total = n_cls * SHAPES_PER_CLASS
    size = int(cfg.image_size)
    images = np.zeros((total, size, size, 3), dtype=np.uint8)
    masks = np.zeros((total, size, size), dtype=bool)
    labels = np.zeros(total, dtype=np.int64)
    for i in range(total):
        images[i], masks[i], labels[i] = _render_shape(i, size, n_cls)
    return Samples(name=cfg.name, classes=list(SHAPE_CLASSES[:n_cls]), labels=labels, images=images,
                   masks=masks, fingerprint=content_hash(images.tobytes(), labels.tobytes()))
