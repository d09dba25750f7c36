"""Files of a trial folder, written atomically (temp file + ``os.replace``) so a reader never sees half."""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Any, Optional

CONFIG = "config.yaml"
RESULT = "result.json"
ERROR = "error.json"
CHECKPOINT = "checkpoint.pt"
TB_DIR = "tb"
LOG = "trial.log"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_error(out_dir: Path, exc: BaseException) -> None:
    write_json_atomic(out_dir / ERROR, {
        "status": "failed",
        "type": type(exc).__name__,
        "error": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    })


def read_json(path: Path | str) -> Optional[dict]:
    """The JSON object in ``path``, or None when it is missing or not (yet) a complete JSON object."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None
