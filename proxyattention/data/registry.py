"""The one table of dataset sources, and :func:`load_samples`, the way every caller gets a dataset.

The table feeds the config check (``dataset.source`` choices, which sources need ``dataset.root``), the
``prepare``/``verify`` CLI and the trial. It names each loader as ``module:function`` and imports it only
when used, so reading the table costs nothing (the planner reads it for every sweep).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from proxyattention.data.samples import DataError, Samples


@dataclass(frozen=True)
class Source:
    """A dataset source: ``loader`` is ``module:function``, a function ``cfg -> Samples``.

    ``needs_root``: the data lives in ``dataset.root`` (it gets a manifest there);
    ``downloads``: ``prepare`` can fetch it (torchvision-backed) when online.
    """

    name: str
    loader: str
    needs_root: bool
    downloads: bool
    about: str

    def load(self, cfg: Any) -> Samples:
        module, _, fn = self.loader.partition(":")
        loader: Callable[[Any], Samples] = getattr(importlib.import_module(module), fn)
        return loader(cfg)


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("digits", "proxyattention.data.sources:load_digits", False, False,
           "scikit-learn's bundled 8x8 handwritten digits (embedded)"),
    Source("shapes", "proxyattention.data.shapes:load_shapes", False, False,
           "synthetic shapes with ground-truth masks (generated)"),
    Source("imagefolder", "proxyattention.data.sources:load_imagefolder", True, False,
           "a folder of class sub-folders"),
    Source("cifar100", "proxyattention.data.sources:load_cifar100", True, True, "CIFAR-100 (torchvision)"),
    Source("caltech101", "proxyattention.data.sources:load_caltech101", True, True,
           "Caltech101 (torchvision)"),
    Source("places365", "proxyattention.data.sources:load_places365", True, True,
           "Places365-Standard, 256 px (torchvision)"),
)}


def source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        raise DataError(f"dataset.source={name!r} has no loader; choose one of: "
                        f"{', '.join(SOURCES)}") from None


def load_samples(cfg: Any, check_manifest: bool = True) -> Samples:
    """The dataset of ``cfg`` (a DatasetConfig), checked against its manifest.

    The manifest (``dataset.cache_dir/manifests``, written by ``verify`` or by the first trial) records
    counts and the content fingerprint: a dataset that changed since is reported with a warning naming
    what changed. Files that ``verify`` found unreadable are left out, with a warning (see
    :mod:`proxyattention.data.manifest`).
    """
    src = source(cfg.source)
    samples = src.load(cfg)
    if check_manifest and src.needs_root:
        from proxyattention.data.manifest import apply_manifest

        samples = apply_manifest(samples, cfg)
    if cfg.num_classes is not None and cfg.num_classes != len(samples.classes):
        raise DataError(f"dataset.num_classes={cfg.num_classes} but {cfg.name} has "
                        f"{len(samples.classes)} classes; remove the key or fix it")
    return samples
