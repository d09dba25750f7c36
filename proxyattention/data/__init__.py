"""Datasets: sources, the one split per (dataset, seed), the image bank, device-side transforms, manifests.

One concept per module:

- :mod:`~proxyattention.data.samples` — :class:`Samples` (a dataset before any split), the folder scan;
- :mod:`~proxyattention.data.registry` — the table of sources and :func:`load_samples`;
- :mod:`~proxyattention.data.sources` / :mod:`~proxyattention.data.shapes` — the loaders;
- :mod:`~proxyattention.data.split` — the seeded, stored split;
- :mod:`~proxyattention.data.bank` — :class:`ImageBank`, uint8 images by dataset index on the device;
- :mod:`~proxyattention.data.transforms` — normalisation and the training augmentation;
- :mod:`~proxyattention.data.manifest` — the dataset manifest (counts, fingerprint, unreadable files);
- :mod:`~proxyattention.data.facts` — what a dataset read from a root is (its fingerprint), for the planner;
- :mod:`~proxyattention.data.listing` — those facts cached by folder and modification time;
- :mod:`~proxyattention.data.cli` — ``python -m proxyattention.data prepare|verify``.

The names below are importable from the package itself; each submodule is imported when first used, so
``import proxyattention.data.registry`` (the config check) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "DataError": "samples", "Samples": "samples", "scan_folder": "samples", "IMAGE_EXTENSIONS": "samples",
    "SOURCES": "registry", "load_samples": "registry",
    "Split": "split", "make_split": "split", "load_or_make_split": "split",
    "ImageBank": "bank", "resize_array": "bank", "decode_resized": "bank", "open_rgb": "bank",
    "normalize": "transforms", "to_float": "transforms", "augment": "transforms",
    "IMAGENET_MEAN": "transforms", "IMAGENET_STD": "transforms",
    "shape_masks": "shapes",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
