"""The listing cache: what a dataset read from ``dataset.root`` is (:class:`DataFacts`: its content
fingerprint, classes and image count), kept by folder and modification time so that planning a sweep
does not read a big dataset again (:mod:`proxyattention.data.facts` reads through it).

Loading a sample list costs a walk over the folder (Places: 1.8M files). The answer is kept under
``dataset.cache_dir/listings`` with a **stamp**: the modification time of every folder of the tree (any
file added, removed or renamed changes its folder's), and, for trees of at most :data:`FILE_STAMP_LIMIT`
files, each file's size and modification time. Planning again stats those and reuses the answer when
none changed; ``verify`` and ``prepare`` record it too. A folder modified within :data:`RACY_S` seconds
of the stamp is not trusted (a coarse clock could hide a change made in the same tick): that answer is
not kept. A file of a bigger tree rewritten in place, keeping its name, is caught by the trial instead,
which then drops the cached answer (:func:`forget`).

Each answer also records a hash of its loader's source file: a changed loader may hash otherwise.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from launcher.fileio import read_json, write_json_atomic
from proxyattention.data.samples import Samples, content_hash

LISTING_VERSION = 1
FILE_STAMP_LIMIT = 20_000  # above this many files only folders are stamped (stat-ing them all would cost seconds)
RACY_S = 2.0  # a folder or file modified this recently when stamped may change again unseen


@dataclass(frozen=True)
class DataFacts:
    """What planning needs of a dataset: its fingerprint (the loader's), class names and image count."""

    fingerprint: str
    classes: list[str]
    images: int


def _root(cfg: Any) -> str:
    return os.path.abspath(os.path.expanduser(str(cfg.root)))


def listing_path(cfg: Any) -> Path:
    """Where the cached facts of ``cfg``'s dataset live: keyed by source, root and label function (what
    the sample list depends on), like the dataset's manifest."""
    root = _root(cfg)
    key = content_hash(cfg.source, root, str(cfg.label_fn))[:10]
    stem = os.path.basename(root.rstrip(os.sep)) or cfg.source
    return Path(os.path.expanduser(str(cfg.cache_dir))) / "listings" / f"{stem}-{key}.json"


def _loader_code(loader: str) -> str:
    """A hash of the source file of ``loader`` (``module:function``)."""
    spec = importlib.util.find_spec(loader.partition(":")[0])
    try:
        return content_hash(Path(spec.origin).read_bytes()) if spec and spec.origin else ""
    except OSError:
        return ""


# -------------------------------------------------------------------------------------------- stamps

def stamp(root: str) -> dict[str, Any]:
    """Modification times of every folder under ``root`` (links followed, hidden entries ignored, as
    the folder scan does) and, for at most :data:`FILE_STAMP_LIMIT` files, each file's size and time."""
    dirs: dict[str, int] = {}
    files: Optional[dict[str, list[int]]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        dirs[rel] = os.stat(dirpath).st_mtime_ns
        if files is None:
            continue
        for f in filenames:
            if f.startswith("."):
                continue
            st = os.stat(os.path.join(dirpath, f))
            files[os.path.join(rel, f)] = [st.st_size, st.st_mtime_ns]
        if len(files) > FILE_STAMP_LIMIT:
            files = None
    return {"dirs": dirs, "files": files}


def _still(root: str, recorded: Mapping[str, Any]) -> bool:
    """Whether nothing a stamp recorded changed (a folder that is gone counts as changed)."""
    try:
        for rel, mtime in recorded["dirs"].items():
            if os.stat(os.path.join(root, rel)).st_mtime_ns != mtime:
                return False
        for rel, (size, mtime) in (recorded.get("files") or {}).items():
            st = os.stat(os.path.join(root, rel))
            if st.st_size != size or st.st_mtime_ns != mtime:
                return False
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return bool(recorded["dirs"])


def _racy(recorded: Mapping[str, Any], taken_ns: int) -> bool:
    limit = taken_ns - int(RACY_S * 1e9)
    times = list(recorded["dirs"].values()) + [m for _, m in (recorded.get("files") or {}).values()]
    return any(t >= limit for t in times)


# ------------------------------------------------------------------------------------------- the cache

def cached(cfg: Any, loader: str) -> Optional[DataFacts]:
    """The cached facts of ``cfg``'s dataset (read by ``loader``) if its stamp still holds, else None."""
    data = read_json(listing_path(cfg))
    if not data or data.get("version") != LISTING_VERSION or data.get("root") != _root(cfg) \
            or data.get("loader") != _loader_code(loader):
        return None
    if not _still(_root(cfg), data.get("stamp") or {}):
        return None
    try:
        return DataFacts(fingerprint=str(data["fingerprint"]), classes=list(data["classes"]),
                         images=int(data["images"]))
    except (KeyError, TypeError, ValueError):
        return None


def remember(cfg: Any, loader: str, samples: Samples, recorded: dict[str, Any], taken_ns: int) -> None:
    """Keep the facts of ``samples`` (read by ``loader``) with the stamp taken before they were loaded
    (:func:`stamp_now`); not when a stamped time is too recent to trust."""
    if _racy(recorded, taken_ns):
        return
    path = listing_path(cfg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"version": LISTING_VERSION, "source": cfg.source, "root": _root(cfg),
                                 "label_fn": str(cfg.label_fn), "loader": _loader_code(loader),
                                 "written_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "fingerprint": samples.fingerprint, "classes": list(samples.classes),
                                 "images": len(samples), "stamp": recorded}, fsync=False)
    except OSError:
        pass  # a read-only cache costs a walk over the data at each planning


def forget(cfg: Any) -> None:
    """Drop the cached facts of ``cfg``'s dataset (a trial found other data than they say)."""
    try:
        listing_path(cfg).unlink(missing_ok=True)
    except OSError:
        pass


def stamp_now(cfg: Any) -> tuple[dict[str, Any], int]:
    """A stamp of ``cfg``'s root and when it was taken; take it *before* loading the samples."""
    return stamp(_root(cfg)), time.time_ns()
