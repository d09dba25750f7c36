"""Datasets, the one split per (dataset, seed), device-side augmentation and the proxy overlay.

Images travel as uint8 (N, 3, S, S) tensors resized once to ``dataset.image_size``; augmentation and
normalisation happen on the training device in batches. Small datasets are decoded once and held on the
device; large ones stream through a DataLoader with workers. Proxies never touch the files: they live in
a :class:`ProxyOverlay` keyed by dataset index.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class DataError(RuntimeError):
    """A dataset problem the user can fix; the message names the file or key."""


@dataclass
class Samples:
    """Everything a source knows about a dataset, before any split.

    Exactly one of ``images`` ((N, H, W, 3) uint8, already decoded) and ``paths`` is set.
    ``official_test`` marks samples of the dataset's own test split, where it has one.
    ``masks`` ((N, H, W) bool, aligned with ``images``) is the ground-truth object mask where the
    dataset has one (the synthetic ``shapes`` source), else None.
    ``fingerprint`` changes when the content changes (file list, sizes, labels or pixels).
    """

    name: str
    classes: list[str]
    labels: np.ndarray
    images: Optional[np.ndarray] = None
    paths: Optional[list[str]] = None
    official_test: Optional[np.ndarray] = None
    fingerprint: str = ""
    masks: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Split:
    """Disjoint index arrays into :class:`Samples`."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    fingerprint: str

    def as_dict(self) -> dict[str, list[int]]:
        return {"train": self.train.tolist(), "val": self.val.tolist(), "test": self.test.tolist()}


# ---------------------------------------------------------------------------------------------- sources

SOURCES: dict[str, Callable[[Any], Samples]] = {}


def source(name: str) -> Callable[[Callable[[Any], Samples]], Callable[[Any], Samples]]:
    def register(fn: Callable[[Any], Samples]) -> Callable[[Any], Samples]:
        SOURCES[name] = fn
        return fn
    return register


def _hash(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()[:16]


@source("digits")
def load_digits(cfg: Any) -> Samples:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), upscaled to RGB uint8.

    Read straight from the file scikit-learn ships (what ``sklearn.datasets.load_digits`` reads):
    importing scikit-learn would cost a sweep cell about a second of start-up.
    """
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise DataError("dataset=digits needs scikit-learn's bundled digits.csv.gz; install scikit-learn "
                        "(`pip install scikit-learn`)")
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    gray = np.round(table[:, :-1].reshape(-1, 8, 8) / 16.0 * 255.0).astype(np.uint8)  # values are 0..16
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    labels = table[:, -1].astype(np.int64)
    return Samples(name="digits", classes=[str(c) for c in range(10)], labels=labels, images=rgb,
                   fingerprint=_hash(rgb.tobytes(), labels.tobytes()))


def resolve_label_fn(spec: str) -> Callable[[str], str]:
    """``parent`` (the image's folder name) or ``module:function`` mapping a path to a label."""
    if spec == "parent":
        return lambda p: os.path.basename(os.path.dirname(p))
    mod, _, fn = spec.partition(":")
    try:
        return getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError, ValueError) as e:
        raise DataError(f"dataset.label_fn={spec!r} cannot be imported ({e}); use 'parent' or "
                        "'package.module:function'") from None


@dataclass
class FolderScan:
    """What a walk over a folder tree found: image files, other files, folders without images."""

    images: list[str]
    skipped: list[str]
    empty_dirs: list[str]


def scan_folder(root: str) -> FolderScan:
    """Walk ``root`` (sorted, following links, hidden entries ignored).

    ``empty_dirs`` are leaf folders with no image file: an empty class folder is not a class (it has
    no image to label), so it is reported instead of silently vanishing.
    """
    images, skipped, empty = [], [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        n_before = len(images)
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            full = os.path.join(dirpath, f)
            (images if f.lower().endswith(IMAGE_EXTENSIONS) else skipped).append(full)
        if not dirnames and len(images) == n_before and dirpath != root:
            empty.append(dirpath)
    return FolderScan(images, skipped, empty)


def list_images(root: str) -> tuple[list[str], list[str]]:
    """All image files under ``root`` (sorted) and the other files that were skipped."""
    scan = scan_folder(root)
    return scan.images, scan.skipped


@source("imagefolder")
def load_imagefolder(cfg: Any) -> Samples:
    """A folder of class sub-folders; ``root/train`` + ``root/test`` mark an official test split."""
    root = cfg.root
    if not root or not os.path.isdir(root):
        raise DataError(f"dataset.root={root!r} is not a folder; point dataset.root at the dataset "
                        f"(for {cfg.name}: see the README's datasets section, or "
                        f"`python -m proxyattention.data prepare {cfg.name} ROOT`)")
    label_fn = resolve_label_fn(cfg.label_fn)
    has_official = all(os.path.isdir(os.path.join(root, s)) for s in ("train", "test")) \
        and cfg.label_fn == "parent"
    parts = [("train", os.path.join(root, "train")), ("test", os.path.join(root, "test"))] \
        if has_official else [("all", root)]
    paths: list[str] = []
    is_test: list[bool] = []
    skipped_all: list[str] = []
    empty_all: list[str] = []
    for part, folder in parts:
        scan = scan_folder(folder)
        paths += scan.images
        is_test += [part == "test"] * len(scan.images)
        skipped_all += scan.skipped
        empty_all += scan.empty_dirs
    if skipped_all:
        log.warning("%d non-image files skipped under %s (first: %s)", len(skipped_all), root,
                    skipped_all[0])
    if empty_all:
        log.warning("%d folders under %s hold no images and give no class (first: %s)", len(empty_all),
                    root, empty_all[0])
    if not paths:
        raise DataError(f"no images found under dataset.root={root!r}; expected class sub-folders "
                        f"with {', '.join(IMAGE_EXTENSIONS[:4])}… files")
    names = [str(label_fn(p)) for p in paths]
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[n] for n in names], dtype=np.int64)
    rel = [os.path.relpath(p, root) for p in paths]
    sizes = [str(os.path.getsize(p)) for p in paths]
    return Samples(name=cfg.name, classes=classes, labels=labels, paths=paths,
                   official_test=np.array(is_test) if has_official else None,
                   fingerprint=_hash("\n".join(rel), "\n".join(sizes), labels.tobytes()))


def load_samples(cfg: Any, check_manifest: bool = True) -> Samples:
    """The dataset of ``cfg`` (a DatasetConfig), checked against its manifest.

    The manifest (``dataset.cache_dir/manifests``, written by ``verify`` or by the first trial) records
    counts and the content fingerprint: a dataset that changed since is reported with a warning naming
    what changed. Files that ``verify`` found unreadable are left out, with a warning (see
    :mod:`proxyattention.datacli`).
    """
    try:
        fn = SOURCES[cfg.source]
    except KeyError:
        raise DataError(f"dataset.source={cfg.source!r} has no loader; choose one of: "
                        f"{', '.join(sorted(SOURCES))}") from None
    samples = fn(cfg)
    if check_manifest:
        from proxyattention.datacli import apply_manifest

        samples = apply_manifest(samples, cfg)
    if cfg.num_classes is not None and cfg.num_classes != len(samples.classes):
        raise DataError(f"dataset.num_classes={cfg.num_classes} but {cfg.name} has "
                        f"{len(samples.classes)} classes; remove the key or fix it")
    return samples


# ------------------------------------------------------------------------------------------------ split

def make_split(labels: np.ndarray, seed: int, val_fraction: float, test_fraction: float,
               official_test: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A seeded, stratified train/val/test split: per class, shuffle, then cut.

    With an official test split, that is the test set and val is cut from the rest.
    Returns sorted index arrays.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    pool = np.arange(len(labels)) if official_test is None else np.flatnonzero(~official_test)
    test_fixed = None if official_test is None else np.flatnonzero(official_test)
    train, val, test = [], [], []
    for c in np.unique(labels[pool]):
        members = pool[labels[pool] == c]
        members = members[rng.permutation(len(members))]
        n = len(members)
        n_test = 0 if test_fixed is not None else int(math.floor(n * test_fraction + 0.5))
        n_val = int(math.floor(n * val_fraction + 0.5))
        if n - n_test - n_val < 1:  # tiny class: keep at least one image to train on
            n_val = max(0, min(n_val, n - n_test - 1))
        test.append(members[:n_test])
        val.append(members[n_test:n_test + n_val])
        train.append(members[n_test + n_val:])
    cat = lambda xs: np.sort(np.concatenate(xs)).astype(np.int64) if xs else np.zeros(0, np.int64)  # noqa: E731
    return cat(train), cat(val), (np.sort(test_fixed) if test_fixed is not None else cat(test))


def load_or_make_split(samples: Samples, cfg: Any, seed: int) -> Split:
    """The split for (dataset, seed): made once, stored under ``dataset.cache_dir/splits``, reused.

    The stored file is checked against the dataset's fingerprint so a changed dataset never reuses a
    stale split.
    """
    key = f"{samples.name}-{samples.fingerprint}-seed{seed}-val{cfg.val_fraction}-test{cfg.test_fraction}"
    path = Path(cfg.cache_dir) / "splits" / f"{key}.json"
    if path.exists():
        try:
            data = json.loads(path.read_text())
            parts = [np.array(data[k], dtype=np.int64) for k in ("train", "val", "test")]
            if sum(len(p) for p in parts) <= len(samples):
                return Split(*parts, fingerprint=data["fingerprint"])
        except (ValueError, KeyError):
            pass
        log.warning("stored split %s is unreadable; making it again", path)
    train, val, test = make_split(samples.labels, seed, cfg.val_fraction, cfg.test_fraction,
                                  samples.official_test)
    fp = _hash(train.tobytes(), val.tobytes(), test.tobytes())
    split = Split(train, val, test, fingerprint=fp)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**split.as_dict(), "fingerprint": fp}))
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache only costs recomputation
        log.warning("could not store the split in %s (%s)", path, e)
    return split


# ------------------------------------------------------------------------------------------- decoding

def open_rgb(path: str) -> Image.Image:
    """Open any image as RGB (grayscale, RGBA, palette, CMYK converted); a bad file names its path."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "RGB":
                return im.copy()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
                return Image.alpha_composite(bg, im).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}. Remove or replace the file "
                        "(`python -m proxyattention.data verify ROOT` lists every unreadable file)") from None


def decode_resized(path: str, size: int) -> Tensor:
    """(3, size, size) uint8 tensor of the image at ``path``."""
    im = open_rgb(path).resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def resize_array(images: np.ndarray, size: int) -> Tensor:
    """(N, H, W, 3) uint8 array → (N, 3, size, size) uint8 tensor (bilinear, antialiased)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    if x.shape[-2:] == (size, size):
        return x.contiguous()
    out = []
    for chunk in x.split(1024):
        y = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
        out.append(y.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


class _PathDataset(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], labels: np.ndarray, size: int):
        self.paths, self.labels, self.size = paths, labels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Tensor, int]:
        return i, decode_resized(self.paths[i], self.size), int(self.labels[i])


# --------------------------------------------------------------------------------------------- banks

class ImageBank:
    """Uint8 images addressed by dataset index, either held on the device or decoded on demand."""

    def __init__(self, samples: Samples, size: int, device: torch.device, in_memory: str,
                 max_memory_mb: int, num_workers: int):
        self.size, self.device, self.num_workers = size, device, num_workers
        self.labels = torch.from_numpy(samples.labels).to(device)
        nbytes = len(samples) * 3 * size * size
        keep = in_memory == "yes" or (in_memory == "auto" and nbytes <= max_memory_mb * 2**20)
        self.images: Optional[Tensor] = None
        self.dataset: Optional[_PathDataset] = None
        self.host: Optional[np.ndarray] = None  # decoded arrays kept at their own size, resized per batch
        if samples.images is not None and keep:
            self.images = resize_array(samples.images, size).to(device)
        elif samples.paths is not None:
            self.dataset = _PathDataset(samples.paths, samples.labels, size)
            if keep:
                self.images = self._decode_all().to(device)
                self.dataset = None
        else:  # decoded arrays too large for the device: keep them at their own size on the host and
            # resize per batch (CIFAR-100 at 224 px would take 9 GB resized, 180 MB as stored)
            self.host = samples.images
        log.info("images: %d at %dx%d, %s", len(samples), size, size,
                 "held on " + str(device) if self.images is not None else "streamed")

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def _loader(self, indices: np.ndarray, batch_size: int) -> torch.utils.data.DataLoader:
        assert self.dataset is not None
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size, sampler=indices.tolist(), num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False)

    def _decode_all(self) -> Tensor:
        out = torch.empty((len(self.dataset), 3, self.size, self.size), dtype=torch.uint8)
        for idx, imgs, _ in self._loader(np.arange(len(self.dataset)), 256):
            out[idx] = imgs
        return out

    def get(self, indices: Tensor) -> Tensor:
        """Un-augmented uint8 images (len, 3, S, S) on the device for ``indices`` (long, any device)."""
        if self.images is not None:
            return self.images[indices.to(self.device)]
        if self.dataset is None:
            return resize_array(self.host[indices.cpu().numpy()], self.size).to(self.device)
        out = [imgs for _, imgs, _ in self._loader(indices.cpu().numpy(), 256)]
        return torch.cat(out).to(self.device) if out else torch.empty(
            (0, 3, self.size, self.size), dtype=torch.uint8, device=self.device)

    def batches(self, order: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """(indices, uint8 images, labels) on the device, in ``order`` (a CPU long tensor)."""
        if self.dataset is None:
            for idx in order.split(batch_size):
                idx_d = idx.to(self.device, non_blocking=True)
                yield idx_d, self.get(idx_d), self.labels[idx_d]
            return
        for idx, imgs, _ in self._loader(order.numpy(), batch_size):
            idx_d = idx.to(self.device, non_blocking=True)
            yield idx_d, imgs.to(self.device, non_blocking=True), self.labels[idx_d]


# ---------------------------------------------------------------------------------------- transforms

def normalize(images: Tensor) -> Tensor:
    """(N, 3, H, W) float in [0, 1] → ImageNet-normalised model input."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def to_float(images: Tensor) -> Tensor:
    return images.float().div_(255.0)


def augment(images: Tensor, generator: torch.Generator, max_degrees: float = 10.0,
            p_flip: float = 0.5, p_rotate: float = 0.5) -> Tensor:
    """The thesis's training augmentation, batched on the images' device.

    images: (N, 3, H, W) float in [0, 1]. Each image is flipped horizontally with probability
    ``p_flip`` and rotated by a uniform angle in [-max_degrees, max_degrees] with probability
    ``p_rotate`` (zeros fill the corners, as torchvision's RandomRotation). Random numbers come from the
    CPU ``generator`` so a seed gives the same augmentation on any device.
    """
    n = images.shape[0]
    flip = torch.rand(n, generator=generator) < p_flip
    rotate = torch.rand(n, generator=generator) < p_rotate
    angle = (torch.rand(n, generator=generator) * 2 - 1) * max_degrees * math.pi / 180 * rotate
    flip_d = flip.to(images.device)
    images = torch.where(flip_d[:, None, None, None], images.flip(-1), images)
    if rotate.any():
        # Only the rotated images are resampled: an identity grid_sample is not exactly the identity.
        sel = rotate.nonzero().squeeze(1)
        cos, sin = torch.cos(angle[sel]), torch.sin(angle[sel])
        theta = torch.zeros(len(sel), 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        part = images[sel.to(images.device)]
        grid = F.affine_grid(theta.to(images.device, images.dtype), list(part.shape), align_corners=False)
        images = images.clone()
        images[sel.to(images.device)] = F.grid_sample(part, grid, mode="bilinear", padding_mode="zeros",
                                                      align_corners=False)
    return images


# -------------------------------------------------------------------------------------- proxy overlay

class ProxyOverlay:
    """Proxy images that replace their originals, keyed by dataset index.

    ``index``: (M,) sorted long; ``images``: (M, 3, S, S) uint8 — stored like an image file would be,
    never written into the dataset folder.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.index = torch.zeros(0, dtype=torch.long, device=device)
        self.images: Optional[Tensor] = None

    def __len__(self) -> int:
        return self.index.numel()

    def clear(self) -> None:
        self.index = torch.zeros(0, dtype=torch.long, device=self.device)
        self.images = None

    def update(self, indices: Tensor, proxies: Tensor) -> None:
        """Add or replace proxies. indices: (K,) long; proxies: (K, 3, S, S) uint8."""
        indices = indices.to(self.device)
        proxies = proxies.to(self.device)
        if self.images is None or len(self) == 0:
            order = indices.argsort()
            self.index, self.images = indices[order], proxies[order]
            return
        keep = ~torch.isin(self.index, indices)
        index = torch.cat([self.index[keep], indices])
        images = torch.cat([self.images[keep], proxies])
        order = index.argsort()
        self.index, self.images = index[order], images[order]

    def apply(self, indices: Tensor, images: Tensor) -> Tensor:
        """images (B, 3, S, S) uint8 for dataset ``indices`` (B,) → the same with proxies swapped in."""
        if len(self) == 0:
            return images
        pos = torch.searchsorted(self.index, indices).clamp_(max=len(self) - 1)
        hit = self.index[pos] == indices
        if not bool(hit.any()):
            return images
        images = images.clone()
        images[hit] = self.images[pos[hit]]
        return images

    def state_dict(self) -> dict[str, Tensor]:
        imgs = self.images if self.images is not None else torch.zeros(0, dtype=torch.uint8)
        return {"index": self.index.cpu(), "images": imgs.cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.index = state["index"].to(self.device)
        self.images = state["images"].to(self.device) if state["index"].numel() else None


# Fill the registry with the torchvision-backed and synthetic sources (they import from this module).
from proxyattention import sources as _sources  # noqa: E402,F401

if __name__ == "__main__":
    from proxyattention.datacli import main

    raise SystemExit(main())
