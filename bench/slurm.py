"""The Slurm backend's costs: ``python bench/slurm.py [--repeats 3] [--status-only]``.

Needs a cluster that answers (``sudo bash .ci/slurm.sh up`` starts a single-node one), except for
``--status-only``. Prints ``FIGURE <name> <value>`` lines:

- ``slurm_submit_100_s``: wall time from starting ``python -m launcher -m hydra/launcher=slurm`` on a
  fresh 100-cell grid (``train.seed=range(0,100)``: planning, 100 cell folders, claims, submitit's 100
  pickles, one ``sbatch``) until it prints "submitted". The jobs are submitted held (``--hold``) and
  cancelled right after, so the figure is the submit path alone.
- ``slurm_roundtrip_ratio``: a trivial cell (digits, test_resnet at 16 px, one epoch, no
  explainability, one CPU) from the command until its ``status.json`` says DONE through Slurm, divided
  by the same cell run with ``hydra/launcher=local`` (command until exit). Median over ``--repeats``
  fresh sweeps each; both times are printed too. Both include the launcher's own start (~3 s of
  Hydra); the Slurm one adds sbatch, scheduling, submitit's job start and the cell's claim.
- ``status_10k_slurm_s``: ``python -m launcher.status SWEEP_DIR --json`` on a synthetic 10,000-cell
  Slurm sweep (best of 3, target <= 1 s): 10 arrays of 1,000 tasks; 2,000 cells DONE and 1,000 FAILED
  by their job's own word, 6,000 queued and 500 running per ``squeue``, 500 recorded RUNNING whose jobs
  ``sacct`` says died (CANCELLED, TIMEOUT, NODE_FAIL). ``squeue``/``sacct`` are stand-ins on PATH that
  print those 6,500 and 3,500 lines (so the figure is this side's cost: reading 10,000 status files and
  7,000 records, parsing both answers); ``--status-only`` runs this figure alone, without a cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
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


def synthetic_slurm_sweep(root: Path, n_cells: int = 10_000, array_size: int = 1000) -> tuple[Path, dict, dict]:
    """A Slurm sweep folder of ``n_cells`` cells in arrays 5000, 5001, …, the environment whose PATH
    starts with ``squeue``/``sacct`` stand-ins answering for them (see the module docstring), and the
    count of each state ``launcher.status`` must show."""
    from launcher.cellstate import STATUS, CellState, CellStatus, cell_dir
    from launcher.fileio import write_json_atomic
    from launcher.manifest import CellRecord, write_plan
    from launcher.slurm_state import RECORD, SlurmRecord

    sweep = root / "status10k"
    records = [CellRecord(id=f"{i:012x}", overrides=[f"train.seed={i % 100}", f"proxy.threshold=0.{i // 100:02d}"])
               for i in range(n_cells)]
    write_plan(sweep, "synthetic", records)
    squeue, sacct = [], []
    expected: dict[str, int] = {}
    died = {"CANCELLED by 0": "CANCELLED", "TIMEOUT": "TIMEOUT", "NODE_FAIL": "CANCELLED"}
    now = time.time()
    for i, r in enumerate(records):
        job = f"{5000 + i // array_size}_{i % array_size}"
        share = i % 20  # 4 DONE, 2 FAILED, 12 queued, 1 running, 1 died, in every 20 cells
        if share < 4:
            state, slurm = CellState.DONE, "COMPLETED"
        elif share < 6:
            state, slurm = CellState.FAILED, "FAILED"
        elif share < 18:
            state, slurm = CellState.PENDING, "PENDING"
        elif share < 19:
            state, slurm = CellState.RUNNING, "RUNNING"
        else:
            state, slurm = CellState.RUNNING, ("CANCELLED by 0", "TIMEOUT", "NODE_FAIL")[i % 3]
        (squeue if slurm in ("PENDING", "RUNNING") else sacct).append(f"{job}|{slurm}")
        shown = died.get(slurm, state.value)
        expected[shown] = expected.get(shown, 0) + 1
        cell = cell_dir(sweep, r.id)
        cell.mkdir(parents=True)
        status = CellStatus(state=state, attempts=1, backend="slurm", job_id=job, heartbeat=now,
                            host="node1", owner_pid=4242, started=now - 60 if state != CellState.PENDING else None,
                            metrics={"test/acc": 0.5} if state == CellState.DONE else {})
        write_json_atomic(cell / STATUS, status.to_dict(), fsync=False)
        write_json_atomic(cell / RECORD, SlurmRecord(job_id=job, submitted=now - 600, submitter="login:1",
                                                     stdout=f"/logs/{job}_0_log.out",
                                                     stderr=f"/logs/{job}_0_log.err").to_dict(), fsync=False)
    stubs = root / "stub_bin"
    stubs.mkdir()
    for tool, lines in (("squeue", squeue), ("sacct", sacct)):
        (stubs / f"{tool}.out").write_text("\n".join(lines) + "\n")
        (stubs / tool).write_text(f"#!/bin/sh\ncat {stubs / (tool + '.out')}\n")
        (stubs / tool).chmod(0o755)
    return sweep, {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"}, expected


def status_10k_slurm(root: Path) -> float:
    sweep, env, expected = synthetic_slurm_sweep(root)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "launcher.status", str(sweep), "--json"], cwd=REPO, env=env,
                             text=True, capture_output=True)
        times.append(time.perf_counter() - t0)
        if out.returncode != 0:
            raise SystemExit(out.stdout + out.stderr)
        counts = {k: n for k, n in json.loads(out.stdout)["counts"].items() if n}
        if counts != expected:
            raise SystemExit(f"status of the synthetic sweep counted {counts}, expected {expected}")
    figure("status_10k_slurm_s", min(times), "10,000 cells, stand-in squeue/sacct, best of 3: "
           + ", ".join(f"{t:.2f}" for t in times))
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the temporary sweep folders")
    ap.add_argument("--status-only", action="store_true", help="only status_10k_slurm_s (needs no cluster)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_slurm_"))
    try:
        status_10k_slurm(root)
        if args.status_only:
            return
        if shutil.which("sbatch") is None:
            raise SystemExit("no Slurm here (`sbatch` not found); `sudo bash .ci/slurm.sh up` starts a single-node one")
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
