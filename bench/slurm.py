"""The Slurm backend's costs, measured on a live cluster: ``python bench/slurm.py [--repeats 3]``.

Needs a cluster that answers (``sudo bash .ci/slurm.sh up`` starts a single-node one). Prints
``FIGURE <name> <value>`` lines:

- ``slurm_submit_100_s``: wall time from starting ``python -m launcher -m hydra/launcher=slurm`` on a
  fresh 100-cell grid (``train.seed=range(0,100)``: planning, 100 cell folders, claims, submitit's 100
  pickles, one ``sbatch``) until it prints "submitted". The jobs are submitted held (``--hold``) and
  cancelled right after, so the figure is the submit path alone.
- ``slurm_roundtrip_ratio``: a trivial cell (digits, test_resnet at 16 px, one epoch, no
  explainability, one CPU) from the command until its ``status.json`` says DONE through Slurm, divided
  by the same cell run with ``hydra/launcher=local`` (command until exit). Median over ``--repeats``
  fresh sweeps each; both times are printed too. Both include the launcher's own start (~3 s of
  Hydra); the Slurm one adds sbatch, scheduling, submitit's job start and the cell's claim.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRIVIAL = ("dataset=digits", "model=test_resnet", "proxy.schedule=1", "explain.enabled=false",
           "dataset.image_size=16")


def figure(name: str, value: float, note: str = "") -> None:
    print(f"FIGURE {name} {value:.3f}" + (f"  # {note}" if note else ""), flush=True)


def cancel_sweep(sweep: Path) -> None:
    ids = {json.loads(p.read_text())["job_id"].split("_")[0] for p in (sweep / "cells").glob("*/slurm.json")}
    if ids:
        subprocess.run(["scancel", *sorted(ids)], capture_output=True)


def submit_100(root: Path) -> float:
    sweep = root / "submit100"
    args = [sys.executable, "-m", "launcher", "hydra/launcher=slurm", *TRIVIAL, "train.seed=range(0,100)",
            "hydra.launcher.cpus_per_task=1", "+hydra.launcher.additional_parameters.hold=true",
            f"hydra.sweep.dir={sweep}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=root, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    elapsed = None
    lines = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("submitted "):
                elapsed = time.perf_counter() - t0
        proc.wait()
    finally:
        cancel_sweep(sweep)
    if elapsed is None or "submitted 100 of 100" not in "".join(lines):
        raise SystemExit("the 100-cell submit did not report 100 submitted cells:\n" + "".join(lines[-30:]))
    return elapsed


def roundtrip_slurm(root: Path, n: int) -> float:
    sweep = root / f"rt_slurm_{n}"
    args = [sys.executable, "-m", "launcher", "hydra/launcher=slurm", *TRIVIAL, "hydra.launcher.cpus_per_task=1",
            f"hydra.sweep.dir={sweep}"]
    t0 = time.perf_counter()
    out = subprocess.run(args, cwd=root, text=True, capture_output=True)
    if out.returncode != 0:
        raise SystemExit(out.stdout + out.stderr)
    try:
        (cell,) = (sweep / "cells").iterdir()
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                state = json.loads((cell / "status.json").read_text())["state"]
            except (OSError, ValueError):
                state = None
            if state == "DONE":
                return time.perf_counter() - t0
            if state in ("FAILED", "TIMEOUT", "CANCELLED"):
                raise SystemExit(f"the trivial cell ended {state}: see {cell}")
            time.sleep(0.1)
        raise SystemExit(f"the trivial cell did not finish in 600 s: see {cell}")
    finally:
        cancel_sweep(sweep)


def roundtrip_local(root: Path, n: int) -> float:
    sweep = root / f"rt_local_{n}"
    args = [sys.executable, "-m", "launcher", "hydra/launcher=local", *TRIVIAL, "hydra.launcher.threads_per_cell=1",
            f"hydra.sweep.dir={sweep}"]
    t0 = time.perf_counter()
    out = subprocess.run(args, cwd=root, text=True, capture_output=True)
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(out.stdout + out.stderr)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the temporary sweep folders")
    args = ap.parse_args()
    if shutil.which("sbatch") is None:
        raise SystemExit("no Slurm here (`sbatch` not found); `sudo bash .ci/slurm.sh up` starts a single-node one")
    root = Path(tempfile.mkdtemp(prefix="bench_slurm_"))
    try:
        figure("slurm_submit_100_s", submit_100(root), "command start -> 'submitted', 100-cell grid, fresh sweep")
        slurm, local = [], []
        for n in range(args.repeats):  # interleaved, so a change in machine load hits both alike
            local.append(roundtrip_local(root, n))
            slurm.append(roundtrip_slurm(root, n))
        s, l = statistics.median(slurm), statistics.median(local)
        figure("slurm_roundtrip_ratio", s / l, f"median of {args.repeats}: Slurm {s:.2f} s / local {l:.2f} s")
        figure("slurm_roundtrip_s", s, "command -> status DONE through Slurm: " + ", ".join(f"{x:.2f}" for x in slurm))
        figure("local_roundtrip_s", l, "command -> exit, hydra/launcher=local: " + ", ".join(f"{x:.2f}" for x in local))
    finally:
        if args.keep:
            print(f"sweep folders kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
