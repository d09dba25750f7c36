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

MIN_CLASSES = 2  # fewer: nothing to tell apart (check_classes)


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


def check_classes(classes: list[str], cfg: Any) -> None:
    """A classifier needs two classes: one class trains to accuracy 1.0 and measures nothing."""
    if len(classes) < MIN_CLASSES:
        where = f"dataset.root={cfg.root!r}" if getattr(cfg, "root", None) else f"dataset {cfg.name}"
        raise DataError(f"{where} has {len(classes)} class with images ({', '.join(classes) or 'none'}); "
                        f"a classifier needs at least {MIN_CLASSES} class folders with images")


def load_samples(cfg: Any, check_manifest: bool = True) -> Samples:
    """The dataset of ``cfg`` (a DatasetConfig), checked against its manifest.

    The manifest (``dataset.cache_dir/manifests``, written by ``verify`` or by the first trial) records
    counts and the content fingerprint: a dataset that changed since is reported with a warning naming
    what changed. Files that ``verify`` found unreadable are left out, with a warning (see
    :mod:`proxyattention.data.manifest`).

    A sweep cell's config holds the fingerprint of the data it was planned for (``dataset.fingerprint``,
    part of its id): other data under that root is an error, never a result filed under that id. A
    dataset with fewer than two classes is an error (it would train to accuracy 1.0 and measure nothing).
    """
    from proxyattention.data.listing import forget

    src = source(cfg.source)
    samples = src.load(cfg)
    planned = getattr(cfg, "fingerprint", None)
    if planned and planned != samples.fingerprint:
        if src.needs_root:
            forget(cfg)  # the cached listing no longer describes the folder: planning reads it again
        raise DataError(f"dataset.fingerprint={planned} but the data of {cfg.name}"
                        + (f" under dataset.root={cfg.root}" if cfg.root else "")
                        + f" now has fingerprint {samples.fingerprint}: it changed since this cell was "
                        "planned, and the cell's id names the data it was planned for. Re-issue the sweep: "
                        "it plans cells for the data as it is now")
    check_classes(samples.classes, cfg)
    if check_manifest and src.needs_root:
        from proxyattention.data.manifest import apply_manifest

        samples = apply_manifest(samples, cfg)
    if cfg.num_classes is not None and cfg.num_classes != len(samples.classes):
        raise DataError(f"dataset.num_classes={cfg.num_classes} but {cfg.name} has "
                        f"{len(samples.classes)} classes; remove the key or fix it")
    return samples
