"""Report speed on a synthetic 1,000-cell sweep folder (no attention maps).

Claim: ``python -m proxyattention.report SWEEP_DIR report.maps=0`` builds the whole report of a
1,000-cell sweep — results.csv, report.md with every table, every figure, the TensorBoard check of 50
cells — in at most 30 s. Timed as the user runs it: a fresh process, imports included.

The sweep: 2 datasets x 2 models x 4 thresholds x 5 weights x 3 subsets x 4 seeds = 960 proxy cells,
their baselines, and some cells FAILED or PENDING; each finished cell has a config.yaml
snapshot, status.json, result.json with a 4-epoch history and explain/* metrics, and TensorBoard events.

    python bench/report.py [--cells 1000] [--keep DIR]

prints ``FIGURE report_1k_s <value> (target <= 30)``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

TARGET_S = 30.0


def synthetic_sweep(root: Path, cells: int = 1000, tensorboard: bool = True, seed: int = 0) -> int:
    """Write a sweep folder of about ``cells`` cells under ``root``; returns the number written."""
    from proxyattention import identity
    from proxyattention.analysis.table import ids_for
    from proxyattention.config import GROUP_SCHEMAS, TrialConfig

    rng = np.random.default_rng(seed)
    base = json.loads(json.dumps({g: v for g, v in __import__("dataclasses").asdict(TrialConfig()).items()
                                  if g in GROUP_SCHEMAS}))
    base["dataset"]["cache_dir"] = "/tmp/unused"
    base["proxy"]["schedule"] = "2,p,2"
    grid = list(itertools.product(["digits", "shapes"], ["test_resnet", "test_efficientnet"],
                                  [0.1, 0.4, 0.8, 0.85], [0.1, 0.2, 0.4, 0.8, 0.95], [0.2, 0.4, 1.0],
                                  [0, 1, 2, 3]))
    extra = max(0, cells - len(grid) - 16)
    grid += [("digits", "test_resnet", 0.4, 0.8, 1.0, 4 + i) for i in range(extra)]
    written = 0
    baselines: dict[str, float] = {}
    for n, (ds, model, th, w, sub, s) in enumerate(grid):
        if written >= cells:
            break
        cfg = json.loads(json.dumps(base))
        cfg["dataset"]["name"] = cfg["dataset"]["source"] = ds
        cfg["model"]["name"] = model
        cfg["proxy"].update(threshold=th, weight=w, subset=sub)
        cfg["train"]["seed"] = s
        full = identity.complete(cfg)
        cid, _, bid = ids_for(full)
        level = {"digits": 0.9, "shapes": 0.7}[ds] + (0.02 if model == "test_resnet" else 0.0)
        if bid not in baselines:
            bcfg = json.loads(json.dumps(cfg))
            bcfg["proxy"]["enabled"] = False
            bcfg["proxy"]["schedule"] = "2,2"
            baselines[bid] = level + rng.normal(0, 0.01)
            _write_cell(root, bid, bcfg, "DONE", baselines[bid], rng, tensorboard, proxy=False)
            written += 1
        state = "DONE" if s < 4 else "PENDING"
        if n % 97 == 5:
            state = "FAILED"
        acc = baselines[bid] + 0.01 * th - 0.005 + rng.normal(0, 0.01)
        _write_cell(root, cid, cfg, state, acc, rng, tensorboard, proxy=True)
        written += 1
    return written


def _write_cell(root: Path, cid: str, cfg: dict, state: str, acc: float, rng: np.random.Generator,
                tensorboard: bool, proxy: bool) -> None:
    d = root / "cells" / cid
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    if state == "PENDING":
        return
    if state == "FAILED":
        (d / "status.json").write_text(json.dumps({"state": "FAILED", "attempts": 1,
                                                   "error": "DataError: dataset.root is not a folder"}))
        return
    history = []
    for e in range(1, 5):
        history.append({"epoch": e, "train/loss": 2.0 / e, "train/acc": acc * e / 4, "val/loss": 2.2 / e,
                        "val/acc": acc * (0.7 + 0.075 * e), "lr": 1e-3 / e,
                        "proxy/images": 50 if (proxy and e == 2) else 0,
                        "proxy/pixels_changed": 0.3 if (proxy and e == 2) else 0.0})
    metrics = {"test/acc": acc, "test/loss": 1 - acc, "val/acc": history[-1]["val/acc"],
               "val/acc_best": history[-1]["val/acc"], "train/loss": 0.5, "train/acc": acc,
               "proxy/images": 50 if proxy else 0, "proxy/steps": int(proxy), "proxy/pixels_changed": 0.3,
               "explain/ad": float(rng.uniform(30, 60)), "explain/ai": float(rng.uniform(5, 20)),
               "explain/ag": float(rng.uniform(1, 6)), "explain/insertion": float(rng.uniform(0.2, 0.4)),
               "explain/deletion": float(rng.uniform(0.1, 0.2)), "explain/images": 128}
    if cfg["dataset"]["name"] == "shapes":
        metrics["explain/pointing"] = float(rng.uniform(0.3, 0.6))
    result = {"status": "done", "trial_id": cid, "metrics": metrics, "history": history,
              "proxy_steps": [], "timing": {"train_s": 10.0, "total_s": 14.0},
              "data": {"split": "synthetic"}, "run": {"target_layer": "layer2", "epochs": 4},
              "config": cfg}
    (d / "result.json").write_text(json.dumps(result))
    (d / "status.json").write_text(json.dumps({"state": "DONE", "attempts": 1, "duration_s": 14.0}))
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        w = SummaryWriter(str(d / "tb"))
        for h in history:
            for k, v in h.items():
                if k != "epoch":
                    w.add_scalar(k, v, h["epoch"])
        for k in ("test/acc", "test/loss"):
            w.add_scalar(k, metrics[k], 4)
        w.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=1000)
    ap.add_argument("--keep", help="write the sweep here (kept) instead of a temporary folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp) / "sweep"
        t0 = time.perf_counter()
        n = synthetic_sweep(root, args.cells)
        print(f"synthetic sweep: {n} cells in {root} ({time.perf_counter() - t0:.1f}s to write)")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "proxyattention.report", str(root), "report.maps=0"],
                              capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"report failed:\n{proc.stdout}\n{proc.stderr}")
        print(proc.stdout.strip())
        name = "report_1k_s" if args.cells == 1000 else f"report_{args.cells}_s"
        print(f"FIGURE {name} {elapsed:.2f} (target <= {TARGET_S:g})")


if __name__ == "__main__":
    main()
