"""The one split per (dataset, seed): seeded, stratified, made once and stored, never re-drawn."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from launcher.fileio import write_json_atomic
from proxyattention.data.samples import Samples, content_hash

log = logging.getLogger(__name__)


@dataclass
class Split:
    """Disjoint index arrays into :class:`Samples`."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    fingerprint: str

    def as_dict(self) -> dict[str, list[int]]:
        return {"train": self.train.tolist(), "val": self.val.tolist(), "test": self.test.tolist()}



def make_split(labels: np.ndarray, seed: int, val_fraction: float, test_fraction: float,
               official_test: Optional[np.ndarray] = None,
               val_max: Optional[int] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A seeded, stratified train/val/test split: per class, shuffle, then cut.

    With an official test split, that is the test set and val is cut from the rest. ``val_max`` caps the
    validation set (each class's share scaled down alike); the images it leaves out train. Returns sorted
    index arrays.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    pool = np.arange(len(labels)) if official_test is None else np.flatnonzero(~official_test)
    test_fixed = None if official_test is None else np.flatnonzero(official_test)
    groups = []
    for c in np.unique(labels[pool]):
        members = pool[labels[pool] == c]
        members = members[rng.permutation(len(members))]
        n = len(members)
        n_test = 0 if test_fixed is not None else int(math.floor(n * test_fraction + 0.5))
        n_val = int(math.floor(n * val_fraction + 0.5))
        if n - n_test - n_val < 1:  # tiny class: keep at least one image to train on
            n_val = max(0, min(n_val, n - n_test - 1))
        groups.append((members, n_test, n_val))
    total_val = sum(g[2] for g in groups)
    if val_max is not None and total_val > val_max:
        scale = val_max / total_val
        groups = [(m, t, int(math.floor(v * scale))) for m, t, v in groups]
    train, val, test = [], [], []
    for members, n_test, n_val in groups:
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
    val_max = getattr(cfg, "val_max", None)
    key = (f"{samples.name}-{samples.fingerprint}-seed{seed}-val{cfg.val_fraction}-test{cfg.test_fraction}"
           + (f"-valmax{val_max}" if val_max is not None else ""))
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
                                  samples.official_test, val_max)
    fp = content_hash(train.tobytes(), val.tobytes(), test.tobytes())
    split = Split(train, val, test, fingerprint=fp)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {**split.as_dict(), "fingerprint": fp}, fsync=False)
    except OSError as e:  # a read-only cache only costs recomputation
        log.warning("could not store the split in %s (%s)", path, e)
    return split


