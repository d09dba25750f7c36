"""A stand-in cell (no torch; a second each) and the ``fake`` launcher fixture that runs sweeps on it.

The stand-in reads its ``config.yaml`` like the real cell, appends one line to ``runs.log`` per run,
and behaves as the environment says: ``FAKE_SLEEP`` seconds, ``FAKE_FAIL`` thresholds that fail. Its
``val/acc_best`` is 0.5 for a baseline and 0.5 + threshold / 10 for a proxy cell.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

FAKE_CELL = r'''
import json, os, subprocess, sys, time, yaml
cell = sys.argv[1]
cfg = yaml.safe_load(open(os.path.join(cell, "config.yaml")))
with open(os.path.join(cell, "runs.log"), "a") as f:
    f.write(f"{os.getpid()} {os.environ.get('OMP_NUM_THREADS')} {os.environ.get('CUDA_VISIBLE_DEVICES')}\n")
if os.environ.get("FAKE_GRANDCHILD"):
    child = subprocess.Popen(["sleep", "300"])
    open(os.path.join(cell, "grandchild.pid"), "w").write(str(child.pid))
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
thr = str(cfg["proxy"]["threshold"]) if cfg["proxy"]["enabled"] else "baseline"
if thr in os.environ.get("FAKE_FAIL", "").split(","):
    json.dump({"status": "failed", "type": "FileNotFoundError", "error": f"no data for {thr}",
               "traceback": "Traceback (most recent call last):\nFileNotFoundError: no data"},
              open(os.path.join(cell, "error.json"), "w"))
    sys.exit(1)
val = 0.5 + (cfg["proxy"]["threshold"] / 10 if cfg["proxy"]["enabled"] else 0.0)  # a landscape to search
json.dump({"status": "done", "metrics": {"test/acc": 0.5, "val/acc_best": val, "proxy/images": 1},
           "timing": {"train_s": 0.1, "total_s": 0.2}}, open(os.path.join(cell, "result.json"), "w"))
'''


def default_signals() -> None:
    """In the child before exec: SIGINT and SIGTERM as a terminal would deliver them."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture
def fake(tmp_path):
    """Run the launcher on stand-in cells: ``fake(*overrides, env=..., background=False)``."""
    mod = tmp_path / "fakecell"
    mod.mkdir()
    (mod / "fake_cell.py").write_text(FAKE_CELL)
    sweep = tmp_path / "sweep"

    def launch(*overrides: str, env: dict | None = None, background: bool = False, sweep_dir: Path = sweep):
        full = dict(os.environ, PYTHONPATH=str(mod), **(env or {}))
        full.pop("CUDA_VISIBLE_DEVICES", None)
        args = [sys.executable, "-m", "launcher", "model=test_resnet", *overrides,
                f"hydra.sweep.dir={sweep_dir}", "hydra.launcher.cell_module=fake_cell",
                "hydra.launcher.heartbeat_s=0.5", "hydra.launcher.gpus=''"]
        if background:
            # The test sends it SIGINT/SIGTERM: give it the default handlers whatever this process
            # inherited (a suite started in the background of a non-interactive shell ignores SIGINT).
            return subprocess.Popen(args, cwd=tmp_path, env=full, text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, preexec_fn=default_signals)
        return subprocess.run(args, cwd=tmp_path, env=full, text=True, capture_output=True, timeout=300)

    launch.sweep = sweep
    return launch


def cells(sweep: Path) -> dict[str, dict]:
    out = subprocess.run([sys.executable, "-m", "launcher.status", str(sweep), "--json"], text=True,
                         capture_output=True, check=True).stdout
    return {c["id"]: c for c in json.loads(out)["cells"]}


def runs(sweep: Path, cid: str) -> int:
    log = sweep / "cells" / cid / "runs.log"
    return len(log.read_text().splitlines()) if log.exists() else 0
