"""The dataset manifest: counts and content fingerprint of a dataset, kept under ``dataset.cache_dir``.

The manifest is a small JSON file under ``dataset.cache_dir/manifests`` — never inside the dataset
folder. :func:`apply_manifest`, called by ``load_samples`` in every trial, warns naming the dataset and
what changed when the data no longer matches it (so a sweep notices a dataset edited under it), and
leaves out the files ``verify`` found unreadable. The first trial to load a dataset without a manifest
writes one. Embedded and generated datasets (digits, shapes) have nothing on disk to change and get none.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from launcher.fileio import write_json_atomic
from proxyattention.data.samples import Samples, content_hash

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
MAX_LISTED = 1000  # paths kept per list in a manifest; counts are always complete


def manifest_path(cfg: Any) -> Optional[Path]:
    """Where the manifest of ``cfg``'s dataset lives, keyed by source, root and label function.

    The dataset's name is not in the key, so ``verify PATH`` and ``dataset=imagefolder
    dataset.root=PATH`` share one manifest. None without a root (embedded and generated sources have none).
    """
    if not cfg.root:
        return None
    root = os.path.abspath(os.path.expanduser(str(cfg.root)))
    key = content_hash(cfg.source, root, str(cfg.label_fn))[:10]
    stem = os.path.basename(root.rstrip(os.sep)) or cfg.source
    return Path(os.path.expanduser(str(cfg.cache_dir))) / "manifests" / f"{stem}-{key}.json"


def summarize(samples: Samples) -> dict[str, Any]:
    counts = np.bincount(samples.labels, minlength=len(samples.classes))
    official = None if samples.official_test is None else int(samples.official_test.sum())
    return {"images": len(samples), "classes": {c: int(n) for c, n in zip(samples.classes, counts)},
            "official_test": official, "fingerprint": samples.fingerprint}


def read_manifest(path: Optional[Path]) -> Optional[dict[str, Any]]:
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return data if data.get("version") == MANIFEST_VERSION else None
    except (OSError, ValueError):
        log.warning("dataset manifest %s is unreadable; it will be written again", path)
        return None


def write_manifest(path: Path, data: dict[str, Any]) -> None:
    """Atomic write: trials of a sweep may write the same manifest at once."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, data, fsync=False)
    except OSError as e:  # a read-only cache costs only the change check
        log.warning("could not write the dataset manifest %s (%s)", path, e)


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two summaries, in words; empty when nothing did."""
    changes = []
    a, b = old["classes"], new["classes"]
    gone, added = [c for c in a if c not in b], [c for c in b if c not in a]
    if gone:
        changes.append(f"{len(gone)} classes gone ({', '.join(gone[:5])}{' …' if len(gone) > 5 else ''})")
    if added:
        changes.append(f"{len(added)} classes added ({', '.join(added[:5])}{' …' if len(added) > 5 else ''})")
    recount = [f"{c} {a[c]}→{b[c]}" for c in a if c in b and a[c] != b[c]]
    if recount:
        changes.append(f"{len(recount)} classes changed size ({', '.join(recount[:5])}"
                       f"{' …' if len(recount) > 5 else ''})")
    if old["images"] != new["images"]:
        changes.append(f"images {old['images']}→{new['images']}")
    if old.get("official_test") != new.get("official_test"):
        changes.append(f"official test images {old.get('official_test')}→{new.get('official_test')}")
    if not changes and old["fingerprint"] != new["fingerprint"]:
        changes.append("same counts but files were replaced, renamed or resized "
                       f"(fingerprint {old['fingerprint']}→{new['fingerprint']})")
    return changes


def _without(samples: Samples, bad: set[str]) -> Samples:
    keep = np.array([p not in bad for p in samples.paths], dtype=bool)
    return dataclasses.replace(
        samples, labels=samples.labels[keep], paths=[p for p, k in zip(samples.paths, keep) if k],
        official_test=None if samples.official_test is None else samples.official_test[keep],
        fingerprint=content_hash(samples.fingerprint, "without", "\n".join(sorted(bad))))


def apply_manifest(samples: Samples, cfg: Any) -> Samples:
    """Check ``samples`` against the dataset's manifest (see the module doc); write one if missing."""
    path = manifest_path(cfg)
    if path is None:
        return samples
    summary = summarize(samples)
    old = read_manifest(path)
    root = os.path.abspath(os.path.expanduser(str(cfg.root)))
    if old is None:
        write_manifest(path, {"version": MANIFEST_VERSION, "dataset": cfg.name, "source": cfg.source,
                              "root": root, "label_fn": cfg.label_fn, "written_by": "trial",
                              "written_at": time.strftime("%Y-%m-%d %H:%M:%S"), **summary,
                              "unreadable": [], "checked": False})
        return samples
    changes = describe_changes(old, summary)
    if changes:
        log.warning(
            "dataset %s (%s) changed since its manifest was written by %s at %s: %s. Cells run before "
            "and after this change saw different data. Run `python -m proxyattention.data verify %s%s` "
            "to check it and record the current state (manifest: %s)",
            cfg.name, root, old.get("written_by"), old.get("written_at"), "; ".join(changes),
            cfg.name if cfg.source != "imagefolder" else root,
            "" if cfg.source == "imagefolder" or not cfg.root else f" --root {root}", path)
        return samples
    bad = {u["path"] for u in old.get("unreadable", [])}
    if bad and samples.paths is not None:
        n_bad = old.get("unreadable_count", len(bad))
        if n_bad > len(bad):  # more than a manifest lists: cannot leave them all out
            log.warning("dataset %s: %d unreadable files, only %d listed in %s; fix the files",
                        cfg.name, n_bad, len(bad), path)
        present = bad & set(samples.paths)
        if present:
            log.warning("dataset %s: leaving out %d unreadable files that verify listed in %s (first: %s)",
                        cfg.name, len(present), path, sorted(present)[0])
            return _without(samples, present)
    return samples


