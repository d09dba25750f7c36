"""Files written whole or not at all, and the names of the files every cell folder has.

Every file the launcher and its apps write for another process to read (``status.json``, ``result.json``,
plans, manifests, checkpoints) goes through :func:`atomic_file`: a unique temp file beside the target,
then ``os.replace``. A reader never sees half a file, and an interrupted write leaves no temp file behind
(a ``kill -9`` can; :func:`remove_stale_temps` clears those). Standard library only: the launcher uses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import socket
import traceback
from pathlib import Path
from typing import IO, Any, Iterator, Optional

# The files every cell folder has: the job's config, and its outcome (an app's cell adds its own files).
CONFIG = "config.yaml"
RESULT = "result.json"
ERROR = "error.json"

_TMP_SUFFIX = ".tmp"
_HOST = socket.gethostname()


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", fsync: bool = True) -> Iterator[IO[Any]]:
    """Open a temp file beside ``path``; on a clean exit it replaces ``path``, on any error it is removed.

    ``fsync`` adds durability across a power loss at ~1 ms a file, so bulk writers (10,000 cell
    snapshots) may skip it; atomicity does not depend on it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str, fsync: bool = True) -> None:
    with atomic_file(path, "w", fsync=fsync) as f:
        f.write(text)


def write_json_atomic(path: str | Path, obj: Any, fsync: bool = True) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, default=str) + "\n", fsync=fsync)


def remove_stale_temps(folder: str | Path, name: str) -> int:
    """Remove temp files of ``name`` that a killed writer left in ``folder``; returns how many."""
    n = 0
    for p in Path(folder).glob(f".{name}.*{_TMP_SUFFIX}"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def read_json(path: str | Path) -> Optional[dict]:
    """The JSON object in ``path``, or None when it is missing or not (yet) a complete JSON object."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def write_error(out_dir: str | Path, exc: BaseException) -> None:
    """``error.json`` of a failed cell: the exception's type, message and traceback."""
    write_json_atomic(Path(out_dir) / ERROR, {
        "status": "failed",
        "type": type(exc).__name__,
        "error": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    })


def digest(obj: Any) -> str:
    """A stable 12-hex-digit id of a JSON value (keys sorted): the one hash every cell id is made with."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
