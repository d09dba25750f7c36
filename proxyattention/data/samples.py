"""What a dataset is before any split: :class:`Samples`, the folder scan and the content hash.

A source (see :mod:`proxyattention.data.registry`) turns a dataset config into :class:`Samples`; every
later step (split, image bank, manifest) reads only this.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

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



def content_hash(*parts: bytes | str) -> str:
    """16 hex digits of SHA-256 over ``parts``: the fingerprint of a dataset's content or a split."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()[:16]


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

