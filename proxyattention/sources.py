"""Dataset sources beyond the embedded digits: torchvision-backed CIFAR-100, Caltech101, Places365, and
the synthetic ``shapes`` dataset with ground-truth object masks.

A source is ``fn(cfg) -> Samples`` registered with :func:`proxyattention.data.source`. The torchvision
classes are the loaders: they read the exact on-disk format (and its checksums) and download it when
``dataset.download=true``. Their errors ("Dataset not found or corrupted") are turned into
:class:`DataError` messages that name the missing folder and the command that fixes it, so an offline
user never sees a stack trace from a download library.

Places256: the thesis's "Places256" are Places images at 256x256. torchvision ships Places365-Standard
with a ``small=True`` 256x256 variant, which is what ``dataset=places256`` loads: the 365 classes of
``train-standard`` (1.8M images) as the pool for train/val, and the official ``val`` split (100 images per
class; the official test labels are not public) as the test set. The thesis's 205-class subset is not
published; for a subset, arrange it as class folders and use ``dataset=imagefolder``.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any, Optional

import numpy as np

from proxyattention.data import DataError, Samples, _hash, source

log = logging.getLogger(__name__)


def _root(cfg: Any) -> str:
    if not cfg.root:
        raise DataError(f"dataset.root is not set for {cfg.name}; pass dataset.root=PATH")
    return os.path.abspath(os.path.expanduser(str(cfg.root)))


def _missing(cfg: Any, what: str, root: str) -> DataError:
    return DataError(
        f"{cfg.name}: {what} under dataset.root={root}. Fix: `python -m proxyattention.data prepare "
        f"{cfg.name} {root}` (downloads when online, or finds and unpacks the archive you copied there), "
        f"or set dataset.download=true, or point dataset.root=PATH at the folder that holds it")


def _download_failed(cfg: Any, root: str, e: BaseException, archive: str) -> DataError:
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return DataError(
        f"{cfg.name}: download into {root} failed ({type(e).__name__}: {first}). Offline: copy "
        f"{archive} into {root} and run `python -m proxyattention.data prepare {cfg.name} {root}`, or "
        "point dataset.root=PATH at an existing copy")


# ------------------------------------------------------------------------------------------- CIFAR-100

@source("cifar100")
def load_cifar100(cfg: Any) -> Samples:
    """CIFAR-100 through ``torchvision.datasets.CIFAR100``: 50,000 train + 10,000 official test images.

    ``root`` holds ``cifar-100-python/`` (or the ``cifar-100-python.tar.gz`` archive, unpacked here on
    first use: finding the archive is not a download).
    """
    from torchvision.datasets import CIFAR100

    root = _root(cfg)
    folder = os.path.join(root, CIFAR100.base_folder)
    archive = os.path.join(root, CIFAR100.filename)
    if not os.path.isdir(folder) and os.path.isfile(archive) and not cfg.download:
        from torchvision.datasets.utils import check_integrity, extract_archive

        if not check_integrity(archive, CIFAR100.tgz_md5):
            raise DataError(f"{cfg.name}: {archive} is corrupted (md5 differs from "
                            f"{CIFAR100.tgz_md5}); download it again")
        log.info("unpacking %s", archive)
        extract_archive(archive, root)
    if not cfg.download and not os.path.isdir(folder):
        raise _missing(cfg, f"no {CIFAR100.base_folder}/ folder and no {CIFAR100.filename}", root)
    try:
        train = CIFAR100(root, train=True, download=bool(cfg.download))
        test = CIFAR100(root, train=False, download=False)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"{cfg.name}: the files in {folder} are incomplete or fail their md5 check "
                        f"({e}). Delete {folder} and run `python -m proxyattention.data prepare "
                        f"{cfg.name} {root}`") from None
    except Exception as e:  # network errors of the download (URLError, HTTPError, timeouts)
        raise _download_failed(cfg, root, e, CIFAR100.filename) from None
    images = np.concatenate([train.data, test.data])
    labels = np.array(list(train.targets) + list(test.targets), dtype=np.int64)
    official = np.zeros(len(labels), dtype=bool)
    official[len(train.targets):] = True
    return Samples(name=cfg.name, classes=list(train.classes), labels=labels, images=images,
                   official_test=official,
                   fingerprint=_hash(images.tobytes(), labels.tobytes(), "\n".join(train.classes)))


# ------------------------------------------------------------------------------------------ Caltech101

@source("caltech101")
def load_caltech101(cfg: Any) -> Samples:
    """Caltech101 through ``torchvision.datasets.Caltech101``: 101 categories, no official test split.

    ``root`` holds ``caltech101/101_ObjectCategories/<category>/image_0001.jpg``; ``BACKGROUND_Google``
    is not a class (torchvision drops it). Images stay files and are decoded like an ImageFolder's.
    """
    from torchvision.datasets import Caltech101

    root = _root(cfg)
    folder = os.path.join(root, "caltech101", "101_ObjectCategories")
    # torchvision creates ``root/caltech101`` before looking; check first so a typo in dataset.root
    # does not leave empty folders behind.
    if not cfg.download and not os.path.isdir(folder):
        raise _missing(cfg, "no caltech101/101_ObjectCategories/ folder", root)
    try:
        ds = Caltech101(root, target_type="category", download=bool(cfg.download))
    except RuntimeError as e:
        raise _missing(cfg, f"torchvision cannot read Caltech101 ({e})", root) from None
    except Exception as e:
        raise _download_failed(cfg, root, e, "caltech-101.zip (its 101_ObjectCategories.tar.gz unpacked "
                                             "into caltech101/)") from None
    paths = [os.path.join(ds.root, "101_ObjectCategories", ds.categories[y], f"image_{i:04d}.jpg")
             for i, y in zip(ds.index, ds.y)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{cfg.name}: {len(missing)} images torchvision expects are missing (first: "
                        f"{missing[0]}); torchvision counts the files of each category folder and reads "
                        "image_0001.jpg … image_NNNN.jpg — remove stray files or download again")
    labels = np.array(ds.y, dtype=np.int64)
    sizes = [str(os.path.getsize(p)) for p in paths]
    rel = [os.path.relpath(p, root) for p in paths]
    return Samples(name=cfg.name, classes=list(ds.categories), labels=labels, paths=paths,
                   fingerprint=_hash("\n".join(rel), "\n".join(sizes), labels.tobytes()))


# ------------------------------------------------------------------------------------ Places365 (256)

@source("places365")
def load_places365(cfg: Any) -> Samples:
    """Places365-Standard, small (256x256) images, through ``torchvision.datasets.Places365``.

    ``train-standard`` is the train/val pool; the official ``val`` split is the test set. ``root`` holds
    ``categories_places365.txt``, ``places365_train_standard.txt``, ``places365_val.txt`` (md5-checked)
    and the folders ``data_256_standard/`` and ``val_256/``.
    """
    from torchvision.datasets import Places365

    root = _root(cfg)
    if not cfg.download:
        needed = [Places365._CATEGORIES_META[0], Places365._FILE_LIST_META["train-standard"][0],
                  Places365._FILE_LIST_META["val"][0], "data_256_standard", "val_256"]
        absent = [n for n in needed if not os.path.exists(os.path.join(root, n))]
        if absent:
            raise _missing(cfg, f"missing {', '.join(absent)}", root)
    parts = []
    try:
        for split in ("train-standard", "val"):
            parts.append(Places365(root, split=split, small=True, download=bool(cfg.download)))
    except RuntimeError as e:  # torchvision: "The file … does not exist or is corrupted"
        raise DataError(f"{cfg.name}: {e} Fix: `python -m proxyattention.data prepare {cfg.name} "
                        f"{root}` or download the devkit filelist_places365-standard.tar again") from None
    except Exception as e:
        raise _download_failed(cfg, root, e, "filelist_places365-standard.tar, "
                                             "train_256_places365standard.tar and val_256.tar") from None
    train, val = parts
    for ds in parts:
        if not os.path.isdir(ds.images_dir):
            raise _missing(cfg, f"no image folder {os.path.basename(ds.images_dir)}/", root)
    paths = [p for p, _ in train.imgs] + [p for p, _ in val.imgs]
    labels = np.array(list(train.targets) + list(val.targets), dtype=np.int64)
    official = np.zeros(len(labels), dtype=bool)
    official[len(train.imgs):] = True
    # The md5-checked file lists define the content; stat-ing 1.8M files on every trial would not pay.
    fp = _hash("\n".join(os.path.relpath(p, root) for p in paths), labels.tobytes(),
               "\n".join(train.classes))
    return Samples(name=cfg.name, classes=list(train.classes), labels=labels, paths=paths,
                   official_test=official, fingerprint=fp)


# --------------------------------------------------------------------------------------------- shapes

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


@source("shapes")
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
                   masks=masks, fingerprint=_hash(images.tobytes(), labels.tobytes()))
