"""The dataset loaders: scikit-learn's embedded digits, folders of class sub-folders, and the
torchvision-backed CIFAR-100, Caltech101 and Places365.

A loader is ``fn(cfg) -> Samples``, listed in :data:`proxyattention.data.registry.SOURCES`. The torchvision
classes are the loaders for their datasets: they read the exact on-disk format (and its checksums) and
download it when ``dataset.download=true``. Their errors ("Dataset not found or corrupted") are turned into
:class:`DataError` messages that name the missing folder and the command that fixes it, so an offline
user never sees a stack trace from a download library.

Places256: the thesis's "Places256" are Places images at 256x256. torchvision ships Places365-Standard
with a ``small=True`` 256x256 variant, which is what ``dataset=places256`` loads: the 365 classes of
``train-standard`` (1.8M images) as the pool for train/val, and the official ``val`` split (100 images per
class; the official test labels are not public) as the test set. The thesis's 205-class subset is not
published; for a subset, arrange it as class folders and use ``dataset=imagefolder``.
"""



from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from proxyattention.data.samples import (
    IMAGE_EXTENSIONS,
    DataError,
    Samples,
    content_hash,
    scan_folder,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- digits

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
                   fingerprint=content_hash(rgb.tobytes(), labels.tobytes()))


# ----------------------------------------------------------------------------------------- imagefolder

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



def load_imagefolder(cfg: Any) -> Samples:
    """A folder of class sub-folders; ``root/train`` + ``root/test`` mark an official test split."""
    root = cfg.root
    if not root or not os.path.isdir(root):
        raise DataError(f"dataset.root={root!r} is not a folder; point dataset.root at the dataset "
                        f"(for {cfg.name}: see docs/datasets.md, or "
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
        others = f" (only {len(skipped_all)} other files, first: {skipped_all[0]})" if skipped_all else ""
        raise DataError(f"no images found under dataset.root={root!r}{others}; expected class sub-folders "
                        f"with {', '.join(IMAGE_EXTENSIONS[:4])}… files")
    names = [str(label_fn(p)) for p in paths]
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[n] for n in names], dtype=np.int64)
    rel = [os.path.relpath(p, root) for p in paths]
    sizes = [str(os.path.getsize(p)) for p in paths]
    return Samples(name=cfg.name, classes=classes, labels=labels, paths=paths,
                   official_test=np.array(is_test) if has_official else None,
                   fingerprint=content_hash("\n".join(rel), "\n".join(sizes), labels.tobytes()))


# ------------------------------------------------------------------------------------- torchvision

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
                   fingerprint=content_hash(images.tobytes(), labels.tobytes(), "\n".join(train.classes)))


# ------------------------------------------------------------------------------------------ Caltech101

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
                   fingerprint=content_hash("\n".join(rel), "\n".join(sizes), labels.tobytes()))


# ------------------------------------------------------------------------------------ Places365 (256)

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
    fp = content_hash("\n".join(os.path.relpath(p, root) for p in paths), labels.tobytes(),
               "\n".join(train.classes))
    return Samples(name=cfg.name, classes=list(train.classes), labels=labels, paths=paths,
                   official_test=official, fingerprint=fp)


