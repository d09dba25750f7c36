"""``verify`` on a 100,000-image folder tree: claim <= 60 s on 2 cores, end to end.

Set-up: 100 class folders x 1,000 tiny PNGs (16x16; every 50th grayscale, every 97th RGBA, so the
non-RGB report has work), one corrupt file and one non-image file. The tree is built once and reused
from ``$PROXYATTENTION_CACHE/bench/verify100k`` (default ``~/.cache/proxyattention``); building it
takes a minute the first time and is not timed. The timed command is the user's:

    python -m proxyattention.data verify ROOT --workers 2

run as a subprocess (interpreter start and imports included), with its manifest written to a
temporary cache. The page cache is warm (the tree was just built or read); a cold disk adds its read
time.

    python bench/verify.py [--images 100000] [--workers 2]

Prints ``FIGURE verify_100k_s <seconds> (target <= 60)``.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def cache_root() -> Path:
    base = os.environ.get("PROXYATTENTION_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                               "proxyattention"))
    return Path(base) / "bench"


def png_bytes(rng: np.random.Generator, mode: str) -> bytes:
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, size=(16, 16, channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def build_tree(root: Path, n_images: int, n_classes: int = 100) -> None:
    """Write the tree (skipped when a complete one is there); distinct files, written as bytes."""
    done = root.parent / f"{root.name}.complete"
    if done.is_file() and done.read_text() == str(n_images):
        return
    print(f"building {n_images} images under {root} (once)", flush=True)
    rng = np.random.default_rng(0)
    pool = {m: [png_bytes(rng, m) for _ in range(64)] for m in ("RGB", "L", "RGBA")}
    per_class = n_images // n_classes
    for c in range(n_classes):
        folder = root / f"class_{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            k = c * per_class + i
            mode = "L" if k % 50 == 0 else "RGBA" if k % 97 == 0 else "RGB"
            (folder / f"img_{i:05d}.png").write_bytes(pool[mode][k % 64])
    (root / "class_000" / "img_00001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "class_001" / "notes.txt").write_text("not an image")
    done.write_text(str(n_images))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    root = cache_root() / f"verify{args.images // 1000}k"
    build_tree(root, args.images)
    with tempfile.TemporaryDirectory(prefix="pa-verify-") as cache:
        env = {**os.environ, "PROXYATTENTION_CACHE": cache}
        cmd = [sys.executable, "-m", "proxyattention.data", "verify", str(root), "--workers",
               str(args.workers), "--cache-dir", cache]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"verify failed ({r.returncode}):\n{r.stderr[-2000:]}")
    lines = r.stdout.splitlines()
    for line in lines[:3] + [x for x in lines if x.strip().startswith(("checked", "unreadable", "non-RGB"))]:
        print(line)
    print(f"FIGURE verify_{args.images // 1000}k_s {seconds:.1f} (target <= 60)", flush=True)


if __name__ == "__main__":
    main()
