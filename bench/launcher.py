"""Launcher overheads, measured: ``python bench/launcher.py [--skip-cells] [--jobs 10000]``.

Prints ``FIGURE <name> <value> (target <op> <value>)`` lines:

- ``cell_overhead_ratio``: (cell wall time − its training wall time) ÷ wall time of
  ``python -c "import torch, timm"``, median over the cells of a real 3-cell sweep (digits,
  test_resnet, ``proxy.schedule=1,p,1``, one worker so cells do not compete for cores). The cell wall
  time is the launcher's (spawn to exit); the trial's own wall time is ``timing.total_s`` of
  ``result.json`` (setup, training, proxy steps, evaluation, explainability: the work the trial
  times itself). What is left — launcher, interpreter start, imports — is the overhead of running a
  trial as its own cell. The stricter variant that counts everything but ``timing.train_s`` as
  overhead is printed too (it grows with evaluation and explainability work, not with the launcher).
- ``plan_10k_s``: wall time of re-issuing ``python -m launcher`` on a 10,000-job grid whose cells are
  all DONE (synthetic status files), until it has decided that nothing runs and printed so.
- ``status_10k_s``: wall time of ``python -m launcher.status SWEEP_DIR --json`` on that sweep.
- ``plan_10k_cold_s``: wall time of planning ``train.seed=range(0,5000)`` with one threshold (10,000
  cells: 5,000 proxy cells and their 5,000 baselines, 10,000 distinct values) with nothing planned
  before — every job composed, validated and named, the command ending with its (capped) listing: a
  dry run, so no folder is written. The model check it includes is the remembered one (see
  ``model_check_first_s``). Printed after it, without a target: the first real launch of the same
  sweep, which also creates the 10,000 cell folders and links (``hydra.launcher.rerun=failed``, so no
  cell runs): that part is filesystem work, ~2–6 s here depending on the disk's moment.
- ``model_check_first_s`` (no target): a one-cell dry run with an empty model-check cache, i.e. the
  one-time cost per model, image size and torch/timm version of checking ``model.name`` and its CAM
  target layer in a subprocess (mostly importing torch and timm).

Also printed, without targets: the first planning of the 10k grid (composition and validation of every
job, 10k cell folders written) and the parts of a cell's time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(args: list[str], cwd: Path, check_rc: tuple[int, ...] = (0,)) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, text=True, capture_output=True)
    dt = time.perf_counter() - t0
    if proc.returncode not in check_rc:
        raise SystemExit(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return dt, proc


def figure(name: str, value: float, op: str, target: float, unit: str = "") -> None:
    print(f"FIGURE {name} {value:.3f} (target {op} {target})" + (f"  # {unit}" if unit else ""), flush=True)


def bench_cells(work: Path, repeats: int) -> None:
    imports = [run([sys.executable, "-c", "import torch, timm"], work)[0] for _ in range(repeats)]
    t_import = statistics.median(imports)
    print(f"import torch, timm: median {t_import:.2f}s over {repeats} runs", flush=True)
    sweep = work / "cells_sweep"
    _, proc = run([sys.executable, "-m", "launcher", "dataset=digits", "model=test_resnet",
                   "proxy.schedule=1,p,1", "proxy.threshold=0.1,0.85", "hydra.launcher.workers=1",
                   f"hydra.sweep.dir={sweep}"], work)
    ratios, strict = [], []
    for cell in sorted((sweep / "cells").iterdir()):
        status = json.loads((cell / "status.json").read_text())
        result = json.loads((cell / "result.json").read_text())
        wall, timing = status["duration_s"], result["timing"]
        ratios.append((wall - timing["total_s"]) / t_import)
        strict.append((wall - timing["train_s"]) / t_import)
        parts = "  ".join(f"{k} {v:.2f}" for k, v in timing.items())
        print(f"cell {cell.name}: wall {wall:.2f}s  ({parts})  (wall - total_s)/import {ratios[-1]:.2f}  "
              f"(wall - train_s)/import {strict[-1]:.2f}", flush=True)
    print(f"strict variant, median (wall - train_s)/import: {statistics.median(strict):.2f}", flush=True)
    figure("cell_overhead_ratio", statistics.median(ratios), "<=", 1.2)


def bench_10k(work: Path, n_seeds: int) -> None:
    from launcher import cellstate
    from launcher.cellstate import CellState, CellStatus, Owner

    sweep = work / "sweep_10k"
    grid = ["model=test_resnet", "proxy.threshold=0.1,0.4,0.8,0.85", "proxy.weight=0.1,0.2,0.4,0.8,0.95",
            "proxy.subset=0.1,0.2,0.4,0.8,0.95", f"train.seed=range(0,{n_seeds})"]
    n_jobs = 4 * 5 * 5 * n_seeds
    cmd = [sys.executable, "-m", "launcher", *grid, f"hydra.sweep.dir={sweep}"]
    # First launch: rerun=failed selects nothing in a fresh sweep, so it plans, writes and stops.
    t_first, proc = run(cmd + ["hydra.launcher.rerun=failed"], work, check_rc=(1,))
    assert "No cell matches" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    cells = sorted((sweep / "cells").iterdir())
    print(f"first plan of {n_jobs} jobs ({len(cells)} cells incl. baselines): {t_first:.2f}s", flush=True)
    owner = Owner.this_process()
    for cell in cells:
        s = CellStatus().started_by(owner, pid=1)
        (cell / "result.json").write_text(json.dumps({"status": "done", "metrics": {"test/acc": 0.5}}))
        cellstate.write_status(cell, s.finished(CellState.DONE, exit_code=0, metrics={"test/acc": 0.5},
                                                result_size=cellstate.result_size(cell)))
    times = []
    for _ in range(3):
        dt, proc = run(cmd, work)
        assert f"All {len(cells)} cells are DONE; nothing to run." in proc.stdout, proc.stdout[-2000:]
        times.append(dt)
    figure("plan_10k_s", min(times), "<=", 2, f"{n_jobs} jobs, {len(cells)} cells, best of 3: "
           + ", ".join(f"{t:.2f}" for t in times))
    times = []
    for _ in range(3):
        dt, proc = run([sys.executable, "-m", "launcher.status", str(sweep), "--json"], work)
        counts = json.loads(proc.stdout)["counts"]
        assert counts["DONE"] == len(cells), counts
        times.append(dt)
    figure("status_10k_s", min(times), "<=", 1, f"{len(cells)} cells, best of 3: "
           + ", ".join(f"{t:.2f}" for t in times))


def bench_cold(work: Path, n_seeds: int = 5000) -> None:
    cache = work / "xdg_cache"
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), PROXYATTENTION_STORE=str(work / "cold_store"))
    one = [sys.executable, "-m", "launcher", "model=test_resnet", "hydra.launcher.dry_run=true",
           f"hydra.sweep.dir={work / 'one'}"]
    t0 = time.perf_counter()
    proc = subprocess.run(one, cwd=work, env=env, text=True, capture_output=True)
    t_check = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    t0 = time.perf_counter()
    proc = subprocess.run(one, cwd=work, env=env, text=True, capture_output=True)
    t_known = time.perf_counter() - t0
    print(f"one-cell dry run: {t_check:.2f}s with an empty model-check cache, {t_known:.2f}s after", flush=True)
    figure("model_check_first_s", t_check - t_known, ">=", 0, "one-time, per model/size/version")
    grid = ["model=test_resnet", "proxy.threshold=0.4", f"train.seed=range(0,{n_seeds})"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "launcher", *grid, f"hydra.sweep.dir={work / 'cold_dry'}",
                           "hydra.launcher.dry_run=true"], cwd=work, env=env, text=True, capture_output=True)
    dt = time.perf_counter() - t0
    assert proc.returncode == 0 and f"dry run: {2 * n_seeds} of {2 * n_seeds} cells" in proc.stdout, proc.stderr[-2000:]
    figure("plan_10k_cold_s", dt, "<=", 5, f"{2 * n_seeds} cells composed, validated and named, nothing cached")
    sweep = work / "cold_10k"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "launcher", *grid, f"hydra.sweep.dir={sweep}",
                           "hydra.launcher.rerun=failed"], cwd=work, env=env, text=True, capture_output=True)
    dt = time.perf_counter() - t0
    assert proc.returncode == 1 and "No cell matches" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    n = len(os.listdir(sweep / "cells"))
    assert n == 2 * n_seeds, n
    print(f"first launch of the same sweep, also creating its {n} cell folders: {dt:.2f}s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-cells", action="store_true", help="only the 10k planning/status figures")
    ap.add_argument("--skip-10k", action="store_true", help="only the cell overhead figure")
    ap.add_argument("--skip-cold", action="store_true", help="skip the cold-planning figures")
    ap.add_argument("--seeds", type=int, default=100, help="seeds in the 10k grid (100 x 100 = 10,000 jobs)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_launcher_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder: {work}  ({os.cpu_count()} cores)", flush=True)
    if not args.skip_cells:
        bench_cells(work, args.repeats)
    if not args.skip_10k:
        bench_10k(work, args.seeds)
    if not args.skip_cold:
        bench_cold(work)


if __name__ == "__main__":
    main()
