"""What a dataset read from ``dataset.root`` *is*, for the planner: :func:`dataset_facts`.

Cell ids leave machine paths out, so the data's content must be in them: the planner writes the data's
fingerprint into each cell's snapshot as ``dataset.fingerprint`` (see :mod:`proxyattention.identity`).
It is the loader's own ``Samples.fingerprint`` (relative paths, sizes and labels for folders; what the
torchvision loaders hash for theirs), so the trial, which loads the data anyway, checks that it still
holds (:func:`proxyattention.data.registry.load_samples`). Answers are cached by folder and
modification time (:mod:`proxyattention.data.listing`).

Torchvision-backed sources import torch to load; the planner imports none, so their cache misses are
answered by ``python -m proxyattention.data.facts`` in a subprocess (a dataset as JSON in, its facts out).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict
from types import SimpleNamespace
from typing import Any, Mapping

from proxyattention.data import listing
from proxyattention.data.listing import DataFacts
from proxyattention.data.registry import check_classes, source
from proxyattention.data.samples import DataError

# What a dataset's sample list depends on (what the subprocess is given).
KEYS = ("name", "source", "root", "label_fn", "download", "cache_dir")


def _cfg(dataset: Any) -> Any:
    """Attribute access over a plain dataset dict (loaders read ``cfg.root``); configs pass through."""
    return SimpleNamespace(**dataset) if isinstance(dataset, Mapping) else dataset


def _require_root(cfg: Any) -> None:
    if getattr(cfg, "download", False) and source(cfg.source).downloads:
        return  # its loader downloads into the root (and makes it)
    if not cfg.root or not os.path.isdir(os.path.expanduser(str(cfg.root))):
        raise DataError(f"dataset.root={cfg.root!r} is not a folder; point dataset.root at the dataset "
                        f"(for {cfg.name}: see docs/datasets.md, or "
                        f"`python -m proxyattention.data prepare {cfg.name} ROOT`)")


def load_facts(cfg: Any) -> DataFacts:
    """Load the dataset's sample list (in this process), cache and return its facts."""
    _require_root(cfg)
    recorded, taken = listing.stamp_now(cfg)
    loaders = logging.getLogger("proxyattention.data")
    level = loaders.level
    loaders.setLevel(logging.ERROR)  # skipped files are the trial's to report: a refusal stays one line
    try:
        samples = source(cfg.source).load(cfg)
    finally:
        loaders.setLevel(level)
    listing.remember(cfg, source(cfg.source).loader, samples, recorded, taken)
    return DataFacts(samples.fingerprint, list(samples.classes), len(samples))


def dataset_facts(dataset: Any) -> DataFacts:
    """The facts of a dataset read from ``dataset.root`` (a plain dict or a config): cached when its
    stamp holds, else loaded — torchvision-backed sources in a subprocess, so the caller imports no torch.

    Raises :class:`DataError` naming the key when the root is missing, holds no images or one class.
    """
    cfg = _cfg(dataset)
    _require_root(cfg)
    facts = listing.cached(cfg, source(cfg.source).loader)
    if facts is None and not source(cfg.source).downloads:
        facts = load_facts(cfg)
    elif facts is None:
        facts = _load_in_subprocess({k: getattr(cfg, k) for k in KEYS})
    check_classes(facts.classes, cfg)
    return facts


def _load_in_subprocess(dataset: dict[str, Any]) -> DataFacts:
    why = "no answer"
    answer = None
    try:
        proc = subprocess.run([sys.executable, "-m", "proxyattention.data.facts"],
                              input=json.dumps(dataset, default=str), capture_output=True, text=True)
        if proc.returncode == 0:  # the answer is the last line (a download may print before it)
            answer = json.loads((proc.stdout.strip().splitlines() or ["null"])[-1])
        else:
            why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    except (OSError, ValueError) as e:
        why = str(e)
    if not isinstance(answer, dict):
        raise DataError(f"dataset.root={dataset['root']!r}: could not read {dataset['name']} ({why})")
    if answer.get("error"):
        raise DataError(answer["error"])
    return DataFacts(answer["fingerprint"], list(answer["classes"]), int(answer["images"]))


def main() -> int:
    """``python -m proxyattention.data.facts``: a dataset dict on stdin, its facts (or error) on stdout."""
    dataset = json.loads(sys.stdin.read())
    try:
        answer: dict[str, Any] = asdict(load_facts(_cfg(dataset)))
    except DataError as e:
        answer = {"error": str(e)}
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
