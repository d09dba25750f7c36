"""The Slurm backend against a real single-node Slurm (``bash .ci/slurm.sh up``), plus its pure parts.

Cluster tests (marked ``slurm``) skip with the reason when no cluster answers; with
``PROXYATTENTION_REQUIRE_SLURM=1`` (set by ``.ci/run``) a missing cluster is a failure instead.
Cells are real (``python -m proxyattention.cell``) on the embedded digits with test_resnet at 16 px,
one CPU each; the test node has ``nproc`` CPUs, so at most that many cells run at once. Every test
cancels the jobs it submitted, so a failure leaves no queue behind for the next one.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
from waiting import wait_for as _wait_for


def wait_for(pred, timeout: float, what: str):
    """Poll every 2 s: each poll may ask squeue/sacct."""
    return _wait_for(pred, timeout, what, step=2.0)

from launcher import cellstate, manifest, slurm, slurm_state
from launcher.cellstate import CellState, CellStatus
from launcher.manifest import CellRecord
from launcher.slurm import (
    ArrayPlan,
    SlurmOptions,
    SlurmSubmitter,
    array_layout,
    chunks,
    sbatch_script,
)
from launcher.slurm_state import SlurmRecord, view

REPO = Path(__file__).resolve().parents[1]
TRIAL = ("dataset=digits", "model=test_resnet", "explain.enabled=false", "dataset.image_size=16")
CHEAP = (*TRIAL, "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.heartbeat_s=2")
REQUIRE_ENV = "PROXYATTENTION_REQUIRE_SLURM"
# A stand-in cell (no torch): notes each run in runs.log, sleeps SLEEP_CELL_S, ends DONE.
SLEEP_CELL = r'''
import json, os, sys, time
cell = sys.argv[1]
with open(os.path.join(cell, "runs.log"), "a") as f:
    f.write(f"{os.getpid()} {os.environ.get('SLURM_JOB_ID', 'local')}\n")
time.sleep(float(os.environ.get("SLEEP_CELL_S", "0")))
json.dump({"status": "done", "metrics": {"test/acc": 0.5}, "timing": {"train_s": 0.1, "total_s": 0.1}},
          open(os.path.join(cell, "result.json"), "w"))
'''


def sleep_cell(tmp_path: Path, seconds: float = 0.0) -> tuple[str, dict]:
    """The stand-in cell's ``hydra.launcher.cell_module`` override and the environment that finds it
    (Slurm jobs inherit the submitting environment)."""
    mod = tmp_path / "sleepcell"
    mod.mkdir(exist_ok=True)
    (mod / "sleep_cell.py").write_text(SLEEP_CELL)
    return "hydra.launcher.cell_module=sleep_cell", {"PYTHONPATH": str(mod), "SLEEP_CELL_S": str(seconds)}


def runs(sweep: Path, cid: str) -> int:
    log = sweep / "cells" / cid / "runs.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def launch_local(sweep: Path, *overrides: str, env: dict) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "launcher", *TRIAL, *overrides, "hydra/launcher=local", "hydra.launcher.gpus=''",
            "hydra.launcher.heartbeat_s=0.5", f"hydra.sweep.dir={sweep}"]
    return subprocess.run(args, cwd=sweep.parent, env={**os.environ, **env}, text=True, capture_output=True,
                          timeout=300)


def cluster_problem() -> Optional[str]:
    """Why no usable Slurm cluster is here (None: one answers, with accounting)."""
    for tool in ("sbatch", "squeue", "sacct", "scontrol"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    try:
        info = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
        acct = subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True, text=True,
                              timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"Slurm does not answer ({e})"
    if info.returncode != 0:
        return f"`sinfo` failed: {info.stderr.strip()}"
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in info.stdout.split()):
        return f"no node is up (sinfo says {info.stdout.split() or 'nothing'})"
    if acct.returncode != 0:
        return f"`sacct` fails (accounting is off; submitit needs it): {acct.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    problem = cluster_problem()
    if problem is None:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but no Slurm cluster: {problem}. `bash .ci/slurm.sh up` starts one (root).")
    pytest.skip(f"no Slurm cluster: {problem} (`sudo bash .ci/slurm.sh up` starts a single-node one)")


def launch(sweep: Path, *overrides: str, background: bool = False, env: Optional[dict] = None):
    args = [sys.executable, "-m", "launcher", *CHEAP, *overrides, f"hydra.sweep.dir={sweep}"]
    full_env = {**os.environ, **(env or {})}
    if background:
        return subprocess.Popen(args, cwd=sweep.parent, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=full_env)
    proc = subprocess.run(args, cwd=sweep.parent, text=True, capture_output=True, timeout=300, env=full_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def status(sweep: Path, as_json: bool = True):
    args = [sys.executable, "-m", "launcher.status", str(sweep)] + (["--json"] if as_json else [])
    out = subprocess.run(args, text=True, capture_output=True, check=True, timeout=120).stdout
    return {c["id"]: c for c in json.loads(out)["cells"]} if as_json else out


def record(sweep: Path, cid: str) -> dict:
    return json.loads((sweep / "cells" / cid / "slurm.json").read_text())


def sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", job_id.split("_")[0]],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        jid, _, state = line.partition("|")
        if jid == job_id:
            return state.split()[0]
    return ""


@pytest.fixture
def sweep(tmp_path: Path):
    """A sweep folder whose Slurm jobs are cancelled when the test ends, whatever happened."""
    path = tmp_path / "sweep"
    yield path
    ids = []
    for rec in (path / "cells").glob("*/slurm.json"):
        d = json.loads(rec.read_text())
        ids += [d["job_id"], *d.get("previous_jobs", [])]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)


def all_in(sweep: Path, *states: str) -> Optional[dict]:
    cells = status(sweep)
    return cells if cells and all(c["state"] in states for c in cells.values()) else None


# ---------------------------------------------------------------------------------------------------
# No cluster needed


def compose_launcher(*overrides: str):
    from hydra import compose, initialize_config_dir

    from launcher import plugin
    from proxyattention.config import register_configs

    register_configs()
    plugin.register_configs()
    plugin.register_resolvers()
    import hydra_plugins.proxyattention_launcher  # noqa: F401  (registers the slurm schema)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    return cfg.hydra.launcher


@pytest.mark.floors
def test_slurm_v100_sbatch_script_is_what_the_profile_says():
    lc = compose_launcher("hydra/launcher=slurm_v100", "hydra.launcher.account=proj42",
                          "hydra.launcher.partition=gpu", "hydra.launcher.setup=[module load cuda]")
    opts = SlurmOptions.from_config(lc)
    script = sbatch_script(opts, Path("/sweeps/s1/slurm"), map_count=300, python="/venv/bin/python")
    assert script == """#!/bin/bash

# Parameters
#SBATCH --account=proj42
#SBATCH --array=0-299%16
#SBATCH --cpus-per-task=8
#SBATCH --error=/sweeps/s1/slurm/%A_%a_0_log.err
#SBATCH --gres=gpu:v100:1
#SBATCH --job-name=proxyattention
#SBATCH --mem=32GB
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/sweeps/s1/slurm/%A_%a_0_log.out
#SBATCH --partition=gpu
#SBATCH --requeue
#SBATCH --signal=USR2@120
#SBATCH --time=720
#SBATCH --wckey=submitit

# setup
export OMP_NUM_THREADS=8 MKL_NUM_THREADS=8
module load cuda

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /sweeps/s1/slurm/%A_%a_%t_log.out --error /sweeps/s1/slurm/%A_%a_%t_log.err \
/venv/bin/python -u -m submitit.core._submit /sweeps/s1/slurm
"""


def test_profile_typos_and_bad_values_are_errors():
    from omegaconf.errors import ConfigKeyError

    with pytest.raises(Exception) as e:
        compose_launcher("hydra/launcher=slurm", "hydra.launcher.partion=gpu")
    assert isinstance(e.value, ConfigKeyError) or "partion" in str(e.value)
    lc = compose_launcher("hydra/launcher=slurm", "hydra.launcher.timeout_min=1")
    with pytest.raises(ValueError, match="signal_delay_s"):
        SlurmOptions.from_config(lc)  # the default 120 s warning does not fit a 1-minute limit
    opts = SlurmOptions.from_config(compose_launcher("hydra/launcher=slurm", "hydra.launcher.requeue=false"))
    assert "--requeue" not in sbatch_script(opts, Path("/s"))


def test_arrays_are_chunked_below_max_array_size():
    assert [len(c) for c in chunks(list(range(2503)), 1001)] == [1001, 1001, 501]
    assert chunks([], 5) == []


def simulate(layout: list[ArrayPlan], durations: list[float]) -> tuple[int, float]:
    """Run a layout the way Slurm schedules it on an unbounded cluster: an array may start once the
    array it waits for has ended (afterany), then runs its tasks in order, at most ``%N`` at once.
    Returns (the most cells running at one time, the time the last cell ends)."""
    events: list[tuple[float, int, int]] = []  # (end time, array, cell)
    running = [0] * len(layout)
    queued = [list(a.cells) for a in layout]
    started = [a.after is None for a in layout]
    remaining = [len(a.cells) for a in layout]
    now, peak, busy = 0.0, 0, 0

    def fill() -> None:
        nonlocal busy, peak
        for k, a in enumerate(layout):
            while started[k] and queued[k] and running[k] < a.parallelism:
                cell = queued[k].pop(0)
                running[k] += 1
                busy += 1
                heapq.heappush(events, (now + durations[cell], k, cell))
        peak = max(peak, busy)

    fill()
    while events:
        now, k, _ = heapq.heappop(events)
        running[k] -= 1
        busy -= 1
        remaining[k] -= 1
        if remaining[k] == 0:
            for j, a in enumerate(layout):
                if a.after == k:
                    started[j] = True
        fill()
    return peak, now


@pytest.mark.parametrize("n_cells, cap, max_size", [
    (5000, 16, 1001),  # the README's case: 5 chunks of <= 1001 used to run 5 x 16 = 80 at once
    (5000, 2, 1001),   # fewer slots than arrays: lanes of chained arrays
    (6, 1, 2),
    (4, 2, 3),
    (1000, 64, 1001),  # one array, %64, as before
    (2002, 1000, 1001),
])
def test_array_layout_caps_running_cells_across_arrays(n_cells, cap, max_size):
    layout = array_layout(n_cells, cap, max_size)
    assert sorted(i for a in layout for i in a.cells) == list(range(n_cells))  # every cell once
    assert all(1 <= len(a.cells) <= max_size for a in layout)
    slots = {a.lane: a.parallelism for a in layout}
    assert sum(slots.values()) == cap and all(a.parallelism == slots[a.lane] for a in layout)
    for k, a in enumerate(layout):  # a lane's arrays run one after the other, each after its predecessor
        earlier = [j for j in range(k) if layout[j].lane == a.lane]
        assert a.after == (earlier[-1] if earlier else None)
    if n_cells <= max_size:
        assert [(len(a.cells), a.parallelism) for a in layout] == [(n_cells, cap)]
    rng = random.Random(0)
    durations = [rng.lognormvariate(0, 1) for _ in range(n_cells)]  # long-tailed, like real cells
    peak, makespan = simulate(layout, durations)
    assert peak == min(cap, n_cells)  # never more than the cap, and the cap's slots are all used
    ideal = max(sum(durations) / cap, max(durations))
    assert makespan < 1.25 * ideal + 2 * max(durations), (makespan, ideal)


def test_the_old_chunking_broke_the_cap():
    """What the lanes replace: every chunk with the whole cap as its %N."""
    old = [ArrayPlan(0, tuple(c), 16) for c in chunks(list(range(5000)), 1001)]
    assert simulate(old, [1.0] * 5000)[0] == 80


@pytest.mark.floors
def test_array_parameters_chain_and_keep_a_users_dependency():
    opts = SlurmOptions(additional_parameters={"dependency": "afterok:99"})
    script = sbatch_script(opts, Path("/s"), map_count=5, parallelism=3, after="123")
    assert "#SBATCH --array=0-4%3" in script
    assert "#SBATCH --dependency=afterok:99,afterany:123" in script
    first = sbatch_script(SlurmOptions(array_parallelism=8), Path("/s"), map_count=5)
    assert "#SBATCH --array=0-4%5" in first and "dependency" not in first


class FakeJob:
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id

    @property
    def paths(self):
        return type("Paths", (), {"stdout": Path(f"/logs/{self.job_id}_%t.out"),
                                  "stderr": Path(f"/logs/{self.job_id}_%t.err")})()


class FakeExecutor:
    """submitit's SlurmExecutor as the submitter uses it: each batch is one sbatch of one array.

    At every sbatch it notes which cells of the sweep are claimed, and the array's %N and dependency."""

    def __init__(self, cells: list[Path], first_id: int = 100) -> None:
        self.cells = cells
        self.params: dict = {}
        self.next_id = first_id
        self.arrays: list[dict] = []

    def update_parameters(self, **kw) -> None:
        self.params.update(kw)

    @contextlib.contextmanager
    def batch(self):
        self._batch: list[tuple[object, FakeJob]] = []
        yield
        array = str(self.next_id)
        self.next_id += 1
        claimed = {c.name for c in self.cells if manifest.claim_holder(c) is not None}
        self.arrays.append({"id": array, "cells": [Path(t.cell_dir).name for t, _ in self._batch],
                            "claimed": claimed, "parallelism": self.params["array_parallelism"],
                            "dependency": self.params["additional_parameters"].get("dependency")})
        for n, (_, job) in enumerate(self._batch):
            job.job_id = f"{array}_{n}"

    def submit(self, task) -> FakeJob:
        job = FakeJob("?")  # submitit knows the id once the batch's sbatch ran
        self._batch.append((task, job))
        return job


def fake_sweep(tmp_path: Path, n: int) -> tuple[Path, list[CellRecord], list[Path]]:
    sweep = tmp_path / "sweep"
    records = [CellRecord(id=f"c{i:02d}", overrides=[f"train.seed={i}"]) for i in range(n)]
    cells = [cellstate.cell_dir(sweep, r.id) for r in records]
    for c in cells:
        c.mkdir(parents=True)
    return sweep, records, cells


def submit_with(fake: FakeExecutor, sweep: Path, records: list[CellRecord], monkeypatch, **opts) -> str:
    monkeypatch.setattr(SlurmSubmitter, "_executor", lambda self: fake)
    out = []
    console = type("Quiet", (), {"say": lambda self, t: out.append(t),
                                 "cell": lambda self, cid, st, d="": out.append(f"{st.value} {cid} {d}")})()
    assert SlurmSubmitter(sweep, records, SlurmOptions(**opts), console=console).run() == 0
    return "\n".join(out)


def test_each_arrays_claims_are_released_once_it_is_submitted(tmp_path, monkeypatch):
    sweep, records, cells = fake_sweep(tmp_path, 6)
    fake = FakeExecutor(cells)
    out = submit_with(fake, sweep, records, monkeypatch, array_parallelism=1, max_array_size=2)
    assert [a["cells"] for a in fake.arrays] == [["c00", "c01"], ["c02", "c03"], ["c04", "c05"]]
    for k, a in enumerate(fake.arrays):
        submitted_before = {c for b in fake.arrays[:k] for c in b["cells"]}
        # At each sbatch the earlier arrays' cells are free for their jobs; this and later ones are held.
        assert a["claimed"] == {c.name for c in cells} - submitted_before, (k, a)
    assert [a["dependency"] for a in fake.arrays] == [None, "afterany:100", "afterany:101"]
    assert [a["parallelism"] for a in fake.arrays] == [1, 1, 1]
    assert all(manifest.claim_holder(c) is None for c in cells)
    for c in cells:
        rec = slurm_state.read_record(c)
        assert rec is not None and cellstate.read_status(c).job_id == rec.job_id
    assert "102 (2 cells, %1, after 101)" in out and "at most 1 cells run at once" in out


def test_a_later_batch_continues_the_lanes_of_the_first(tmp_path, monkeypatch):
    sweep, records, cells = fake_sweep(tmp_path, 8)
    fake = FakeExecutor(cells)
    submit_with(fake, sweep, records[:4], monkeypatch, array_parallelism=2, max_array_size=2)
    assert [(a["parallelism"], a["dependency"]) for a in fake.arrays] == [(1, None), (1, None)]
    monkeypatch.setattr(slurm, "live_arrays", lambda ids: set(ids))  # both still queued
    submit_with(fake, sweep, records[4:], monkeypatch, array_parallelism=2, max_array_size=2)
    assert [(a["parallelism"], a["dependency"]) for a in fake.arrays[2:]] == [(1, "afterany:100"),
                                                                             (1, "afterany:101")]


class SnapshotExecutor(FakeExecutor):
    """A FakeExecutor that also notes, at every sbatch, the files at the top of each cell folder."""

    def __init__(self, cells: list[Path]) -> None:
        super().__init__(cells)
        self.files: list[dict[str, list[str]]] = []

    @contextlib.contextmanager
    def batch(self):
        with super().batch():
            yield
            self.files.append({c.name: files(c) for c in self.cells})


def files(cell: Path) -> list[str]:
    """The files at the top of a cell folder, its claim files left out."""
    return sorted(n for n in os.listdir(cell) if not n.startswith(manifest.CLAIM_PREFIX))


def ended_done(cell: Path) -> None:
    """A cell as a finished attempt leaves it: its result, and a DONE status that trusts it."""
    (cell / "result.json").write_text(json.dumps({"status": "done", "metrics": {"test/acc": 0.5}}))
    (cell / "runs.log").write_text("1 local\n")
    cellstate.write_status(cell, CellStatus(state=CellState.DONE, attempts=1,
                                            result_size=cellstate.result_size(cell)))


def damaged_store(tmp_path: Path) -> tuple[Path, list[CellRecord], list[Path]]:
    """c00 DONE; c01 a status that cannot be trusted; c02 DONE with a truncated result; c03 FAILED."""
    sweep, records, cells = fake_sweep(tmp_path, 4)
    for c in cells[:3]:
        ended_done(c)
    (cells[1] / "status.json").write_text(json.dumps({"state": "BOGUS", "attempts": 1}))
    (cells[2] / "result.json").write_text((cells[2] / "result.json").read_text()[:10])
    cellstate.write_status(cells[3], CellStatus(state=CellState.FAILED, attempts=1, error="exit code 1"))
    assert [cellstate.read_status(c).state for c in cells] == [CellState.DONE, CellState.DAMAGED,
                                                              CellState.DAMAGED, CellState.FAILED]
    return sweep, records, cells


@pytest.mark.parametrize("rerun, submitted, moved", [
    ("failed", ["c01", "c02", "c03"], []),
    ("damaged", ["c01", "c02"], []),
    ("not_done", ["c01", "c02", "c03"], []),
    ("all", ["c00", "c01", "c02", "c03"], ["c00", "c03"]),
])
def test_damaged_cells_are_set_aside_before_they_are_submitted(tmp_path, monkeypatch, rerun, submitted, moved):
    """As the local backend does: a DAMAGED cell's files go to damaged-<stamp>/ under its claim, before
    sbatch, so its job never reads them nor runs over them; every other cell is left as it was."""
    sweep, records, cells = damaged_store(tmp_path)
    before = {c.name: files(c) for c in cells}
    fake = SnapshotExecutor(cells)
    out = submit_with(fake, sweep, records, monkeypatch, rerun=rerun, max_array_size=10)
    assert [c for a in fake.arrays for c in a["cells"]] == submitted, out
    # Named with the reason before anything is submitted, whatever the rerun mode.
    assert "DAMAGED c01 status.json: state \"BOGUS\" is not a cell state" in out, out
    assert "DAMAGED c02 status.json says DONE but result.json" in out, out
    (at_sbatch,) = fake.files
    for cid in ("c01", "c02"):  # set aside before the sbatch, config.yaml and claims left
        cell = sweep / "cells" / cid
        (aside,) = cell.glob("damaged-*")
        assert at_sbatch[cid] == [aside.name], at_sbatch
        assert files(aside) == before[cid]
        assert f"{cid}  damaged files moved to {aside}" in out
        s = cellstate.read_status(cell)
        assert s.state == CellState.PENDING and s.backend == "slurm" and s.job_id and s.attempts == 1
        assert s.error is None and s.metrics == {}
    assert json.loads((sweep / "cells" / "c01" / fake.files[0]["c01"][0] / "status.json").read_text())[
        "state"] == "BOGUS"
    assert len((sweep / "cells" / "c02" / fake.files[0]["c02"][0] / "result.json").read_text()) == 10
    for cid in ("c00", "c03"):
        cell = sweep / "cells" / cid
        assert not list(cell.glob("damaged-*"))
        if cid in moved:  # rerun=all: earlier results to previous/<stamp>/, the attempts kept
            assert [p.name for p in (cell / "previous").iterdir()] and "result.json" not in os.listdir(cell)
            assert cellstate.read_status(cell).attempts == 1
        elif cid not in submitted:
            assert files(cell) == before[cid]  # untouched
    if rerun == "damaged":
        assert cellstate.read_status(cells[3]).state == CellState.FAILED
    assert cellstate.read_status(cells[0]).state == (CellState.PENDING if rerun == "all" else CellState.DONE)


def test_a_dry_run_names_damaged_cells_and_moves_nothing(tmp_path, monkeypatch):
    sweep, records, cells = damaged_store(tmp_path)
    before = {c.name: files(c) for c in cells}
    import io

    from launcher.console import Console

    shown = io.StringIO()
    opts = SlurmOptions(rerun="damaged", max_array_size=10, dry_run=True)
    assert SlurmSubmitter(sweep, records, opts, console=Console(records, stream=shown)).run() == 0
    out = shown.getvalue()
    assert {c.name: files(c) for c in cells} == before and not (sweep / "slurm").exists()
    line = next(ln for ln in out.splitlines() if ln.startswith("DAMAGED") and "c01" in ln)
    assert "BOGUS" in line, out
    assert "dry run: 2 of 4 cells would be submitted" in out, out
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.startswith("c0")}
    assert [rows[c][-1] for c in ("c00", "c01", "c02", "c03")] == ["no", "yes", "yes", "no"], out


def test_a_job_that_finds_its_cell_damaged_sets_its_files_aside_and_runs_it_anew(tmp_path, monkeypatch):
    """What a Slurm array task runs, here in this process: a cell damaged while its job was queued is
    run from scratch, its files kept aside, never run over; the record of the job itself stays."""
    import signal

    from launcher.slurm_job import CellJob

    module, env = sleep_cell(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    sweep, records, (cell,) = fake_sweep(tmp_path, 1)
    ended_done(cell)
    (cell / "result.json").write_text("{")
    slurm_state.write_record(cell, SlurmRecord(job_id="7_0", submitted=time.time(), submitter="login:1",
                                               stdout="/x.out", stderr="/x.err"))
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    usr2 = signal.getsignal(signal.SIGUSR2)
    try:
        got = CellJob(cell_dir=str(cell), heartbeat_s=0.5, cell_module=module.split("=", 1)[1])()
    finally:
        signal.signal(signal.SIGUSR2, usr2)
    assert got["state"] == "DONE"
    s = cellstate.read_status(cell)
    assert s.state == CellState.DONE and s.attempts == 2 and s.job_id == "7_0"
    (aside,) = cell.glob("damaged-*")
    assert (aside / "result.json").read_text() == "{" and (aside / "runs.log").read_text() == "1 local\n"
    assert runs(sweep, "c00") == 1  # its own run, in a fresh log
    assert slurm_state.read_record(cell).job_id == "7_0" and not (aside / "slurm.json").exists()


def test_sacct_ranges_of_tasks_that_never_started_are_read_per_task(monkeypatch):
    calls = []

    def fake_run(cmd, timeout=60.0):
        calls.append(cmd[0])
        if cmd[0] == "squeue":
            return "7_0|RUNNING\n"
        return "7_1|FAILED\n7_[2-3,5%2]|CANCELLED by 0\n8|TIMEOUT\n"

    monkeypatch.setattr(slurm_state, "_run", fake_run)
    got = slurm_state.job_states(["7_0", "7_1", "7_3", "7_5", "7_4", "8"])
    assert got == {"7_0": "RUNNING", "7_1": "FAILED", "7_3": "CANCELLED", "7_5": "CANCELLED", "8": "TIMEOUT"}
    assert calls == ["squeue", "sacct"]  # one call each for all of them
    calls.clear()
    assert slurm_state.in_slurm(Path("/nowhere"), {"a": CellStatus(state=CellState.PENDING)}) == {}
    assert calls == []  # no cell names a Slurm job: Slurm is not asked


def stub_slurm(tmp_path: Path, squeue: str = "", sacct: str = "") -> tuple[dict, Path]:
    """``squeue``/``sacct`` stand-ins first on PATH that print the given lines and log each call."""
    bin_dir = tmp_path / "stub_bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "slurm_calls.log"
    for tool, text in (("squeue", squeue), ("sacct", sacct)):
        (bin_dir / f"{tool}.out").write_text(text)
        script = bin_dir / tool
        script.write_text(f"#!/bin/sh\necho {tool} >> {calls}\ncat {bin_dir / (tool + '.out')}\n")
        script.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, calls


def test_local_launch_leaves_cells_queued_in_slurm_to_their_job(tmp_path):
    """squeue/sacct are stand-ins here; the cluster test below does the same against real Slurm."""
    module, env = sleep_cell(tmp_path)
    sweep = tmp_path / "sweep"
    slurm_env, calls = stub_slurm(tmp_path, squeue="77_0|PENDING\n")
    first = launch_local(sweep, "train.seed=0", module, env={**env, **slurm_env})
    assert first.returncode == 0, first.stdout + first.stderr
    assert not calls.exists()  # no cell names a Slurm job: Slurm is not asked
    queued, other = sorted(p.name for p in (sweep / "cells").iterdir())
    # `queued` as the Slurm submitter leaves a cell: PENDING, naming its job, with its record.
    cell = sweep / "cells" / queued
    (cell / "result.json").unlink()
    cellstate.write_status(cell, CellStatus(state=CellState.PENDING, attempts=1, backend="slurm", job_id="77_0"))
    slurm_state.write_record(cell, SlurmRecord(job_id="77_0", submitted=time.time(), submitter="login:1",
                                               stdout="/x.out", stderr="/x.err"))
    second = launch_local(sweep, "train.seed=0", module, env={**env, **slurm_env})
    assert second.returncode == 1, second.stdout + second.stderr  # the queued cell is not DONE yet
    assert f"cell {queued} is queued in Slurm as job 77_0; skipped" in second.stdout
    assert runs(sweep, queued) == 1 and runs(sweep, other) == 1
    assert calls.read_text().split() == ["squeue"]  # one call for the sweep; squeue knew the job
    # Once the job is gone (cancelled), the local launch runs the cell.
    calls.unlink()
    slurm_env, calls = stub_slurm(tmp_path, squeue="", sacct="77_0|CANCELLED by 0\n")
    third = launch_local(sweep, "train.seed=0", module, env={**env, **slurm_env})
    assert third.returncode == 0, third.stdout + third.stderr
    assert runs(sweep, queued) == 2 and "in Slurm" not in third.stdout
    assert calls.read_text().split() == ["squeue", "sacct"]


def _status(state: CellState, job: Optional[str] = "7_1", **kw) -> CellStatus:
    return CellStatus(state=state, backend="slurm", job_id=job, **kw)


REC = SlurmRecord(job_id="7_1", submitted=1000.0, submitter="login:1", stdout="/x.out", stderr="/nonexistent.err")


@pytest.mark.parametrize("slurm, recorded, expected, interrupted", [
    ("PENDING", CellState.PENDING, CellState.PENDING, False),
    ("REQUEUED", CellState.PENDING, CellState.PENDING, False),
    ("RUNNING", CellState.PENDING, CellState.RUNNING, False),
    ("RUNNING", CellState.RUNNING, CellState.RUNNING, False),
    ("CANCELLED", CellState.PENDING, CellState.CANCELLED, True),
    ("CANCELLED", CellState.RUNNING, CellState.CANCELLED, True),
    ("TIMEOUT", CellState.RUNNING, CellState.TIMEOUT, False),
    ("FAILED", CellState.RUNNING, CellState.FAILED, False),
    ("OUT_OF_MEMORY", CellState.RUNNING, CellState.FAILED, False),
    ("NODE_FAIL", CellState.RUNNING, CellState.CANCELLED, True),  # rerunnable
    ("PREEMPTED", CellState.RUNNING, CellState.CANCELLED, True),
    ("COMPLETED", CellState.RUNNING, CellState.FAILED, False),  # ended without the cell's word
])
def test_slurm_state_view(slurm, recorded, expected, interrupted):
    got = view(_status(recorded), REC, slurm, now=1010.0)
    assert got.state == expected
    assert got.interrupted == interrupted
    assert got.job_id == "7_1"


def test_slurm_state_view_trusts_the_jobs_own_end_and_ignores_other_backends():
    done = _status(CellState.DONE)
    assert view(done, REC, "CANCELLED") is done
    failed = _status(CellState.FAILED, error="Traceback ... ValueError")
    assert view(failed, REC, "FAILED").error == failed.error
    local = CellStatus(state=CellState.RUNNING, backend="local")
    assert view(local, REC, "CANCELLED") is local
    # Unknown to Slurm: queued a moment ago (accounting lag) vs. long gone.
    assert view(_status(CellState.PENDING), REC, None, now=1010.0).state == CellState.PENDING
    assert view(_status(CellState.PENDING), REC, None, now=9999.0).state == CellState.CANCELLED


# ---------------------------------------------------------------------------------------------------
# Against the cluster


@pytest.mark.slurm
def test_time_limit_requeues_and_resumes_or_ends_timeout(cluster, tmp_path):
    """1-minute limit, SIGUSR2 5 s before it. Requeue on: checkpoint, requeue, resume from the epoch
    reached; requeue off: killed at the limit, TIMEOUT. The two run side by side."""
    on, off = tmp_path / "requeue_on", tmp_path / "requeue_off"
    common = ("hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=5")
    try:
        # 190 epochs (≈ 2 min of training on an idle core: 60 took 35 s) cannot finish inside one minute;
        # the test only waits for the first resume and cancels the rest. (Not 200: the two sweeps would
        # plan the same cell, which the store runs once.)
        launch(on, "proxy.schedule=190", *common, "hydra.launcher.max_requeues=10")
        launch(off, "proxy.schedule=200", *common, "hydra.launcher.requeue=false")
        (cid_on,) = status(on)
        (cid_off,) = status(off)
        log = on / "cells" / cid_on / "stderr.log"

        def resumed() -> bool:
            c = status(on)[cid_on]
            text = log.read_text() if log.exists() else ""
            return c["attempts"] >= 2 and "resuming from" in text and c["state"] in ("RUNNING", "DONE")

        wait_for(resumed, 200, "the requeued cell to resume")
        text = log.read_text()
        resumed_at = int(text.split("resuming from", 1)[1].split("after epoch", 1)[1].split()[0])
        assert resumed_at >= 1, text
        assert "interrupted; the last checkpoint" in text  # the first attempt stopped at a checkpoint
        rec = record(on, cid_on)
        restarts = subprocess.run(["scontrol", "show", "job", rec["job_id"].split("_")[0]],
                                  capture_output=True, text=True).stdout
        assert "Restarts=0" not in restarts  # Slurm requeued the same job id (submitit checkpointing)

        c = wait_for(lambda: all_in(off, "TIMEOUT", "DONE", "FAILED", "CANCELLED"), 150, "the no-requeue cell")
        assert c[cid_off]["state"] == "TIMEOUT", c
        assert c[cid_off]["attempts"] == 1
        assert wait_for(lambda: sacct_state(record(off, cid_off)["job_id"]) == "TIMEOUT", 30, "sacct TIMEOUT")
    finally:
        for s in (on, off):
            for rec in (s / "cells").glob("*/slurm.json"):
                subprocess.run(["scancel", json.loads(rec.read_text())["job_id"]], capture_output=True)


@pytest.mark.slurm
def test_sweep_2x2_completes_in_chunked_arrays(cluster, sweep):
    out = launch(sweep, "proxy.schedule=1", "train.seed=0,1", "train.max_lr=0.001,0.002",
                 "hydra.launcher.max_array_size=3", "hydra.launcher.array_parallelism=2")
    assert "submitted 4 of 4 cells" in out, out
    assert str(sweep) in out
    arrays = out.split("job arrays:", 1)[1].split(";")[0]
    assert arrays.count("(") == 2, out  # two arrays below max_array_size, one per lane
    assert "at most 2 cells run at once (2 lanes)" in out, out
    cells = wait_for(lambda: all_in(sweep, "DONE", "FAILED", "CANCELLED", "TIMEOUT"), 240, "4 cells to end")
    assert {c["state"] for c in cells.values()} == {"DONE"}, cells
    text = status(sweep, as_json=False)
    assert "4 cells: 4 DONE" in text
    for cid in cells:
        cell = sweep / "cells" / cid
        for name in ("config.yaml", "status.json", "result.json", "checkpoint.pt", "trial.log",
                     "stdout.log", "stderr.log", "slurm.json"):
            assert (cell / name).is_file(), f"{cell}/{name}"
        assert any((cell / "tb").iterdir())
        rec = record(sweep, cid)
        assert Path(rec["stdout"]).is_file()
        assert sacct_state(rec["job_id"]) == "COMPLETED"
        assert json.loads((cell / "status.json").read_text())["job_id"] == rec["job_id"]
    scripts = [s.read_text() for s in (sweep / "slurm").glob("*.sh")]
    # Two lanes of one slot each (the cap 2 over both arrays), two cells each.
    assert scripts and all("#SBATCH --array=0-1%1" in s for s in scripts), scripts
    again = launch(sweep, "proxy.schedule=1", "train.seed=0,1", "train.max_lr=0.001,0.002")
    assert "All 4 cells are DONE; nothing to submit" in again


@pytest.mark.slurm
def test_raising_cell_is_failed_with_its_traceback(cluster, sweep, tmp_path):
    root = tmp_path / "images"
    for k in range(2):
        (root / f"class{k}").mkdir(parents=True)
        for i in range(3):
            (root / f"class{k}" / f"{i}.png").write_bytes(b"missing pixels")  # passes planning, fails to decode
    launch(sweep, "dataset=imagefolder", f"dataset.root={root}", "proxy.schedule=1")
    cells = wait_for(lambda: all_in(sweep, "FAILED", "DONE", "CANCELLED", "TIMEOUT"), 120, "the cell to end")
    (c,) = cells.values()
    assert c["state"] == "FAILED"
    assert "Traceback" in c["error"] or 'File "' in c["error"], c["error"]
    assert "DataError" in c["error"] and "cannot read image" in c["error"]
    assert "FAILED" in status(sweep, as_json=False) and "DataError" in status(sweep, as_json=False)
    assert sacct_state(record(sweep, c["id"])["job_id"]) == "FAILED"  # never COMPLETED


@pytest.mark.slurm
def test_scancel_one_cell_then_rerun_submits_only_it(cluster, sweep):
    overrides = ("proxy.schedule=200", "train.seed=0,1")  # long: both are still running when we look
    launch(sweep, *overrides)
    def one_running():
        cells = all_in(sweep, "RUNNING", "PENDING")  # on a 1-CPU node the second one waits in the queue
        return cells if cells and any(c["state"] == "RUNNING" for c in cells.values()) else None

    cells = wait_for(one_running, 90, "a cell to run")
    victim = next(cid for cid, c in cells.items() if c["state"] == "RUNNING")
    (other,) = set(cells) - {victim}
    job = record(sweep, victim)["job_id"]
    kept = record(sweep, other)["job_id"]
    subprocess.run(["scancel", job], check=True)
    wait_for(lambda: status(sweep)[victim]["state"] == "CANCELLED", 60, "CANCELLED")
    assert status(sweep)[other]["state"] in ("RUNNING", "PENDING")
    assert wait_for(lambda: sacct_state(job) == "CANCELLED", 30, "sacct CANCELLED")
    out = launch(sweep, *overrides)
    assert "submitted 1 of 2 cells" in out, out
    assert record(sweep, other)["job_id"] == kept  # the live job was not submitted again
    new = record(sweep, victim)
    assert new["job_id"] != job and new["previous_jobs"] == [job]
    # rerun=failed finds nothing now: the cancelled cell is queued again, the other still runs.
    out = launch(sweep, *overrides, "hydra.launcher.rerun=failed")
    assert "nothing to submit" in out, out


@pytest.mark.slurm
def test_rerun_damaged_sets_the_damaged_files_aside_and_redoes_the_cell(cluster, sweep, tmp_path):
    module, env = sleep_cell(tmp_path)
    launch(sweep, "train.seed=0", module, env=env)
    ended = ("DONE", "FAILED", "CANCELLED", "TIMEOUT")
    cells = wait_for(lambda: all_in(sweep, *ended), 120, "the cells to end")
    assert {c["state"] for c in cells.values()} == {"DONE"}, cells
    victim, other = sorted(cells)
    first_job = record(sweep, victim)["job_id"]
    result = sweep / "cells" / victim / "result.json"
    result.write_text(result.read_text()[:10])  # truncated: DAMAGED, never DONE
    assert status(sweep)[victim]["state"] == "DAMAGED"
    out = launch(sweep, "train.seed=0", module, "hydra.launcher.rerun=damaged", env=env)
    assert "submitted 1 of 2 cells" in out and f"{victim}  damaged files moved to" in out, out
    cells = wait_for(lambda: all_in(sweep, *ended), 120, "the damaged cell to be redone")
    assert {c["state"] for c in cells.values()} == {"DONE"}, cells
    assert cells[victim]["attempts"] == 2 and cells[other]["attempts"] == 1
    assert record(sweep, victim)["job_id"] != first_job
    (aside,) = (sweep / "cells" / victim).glob("damaged-*")
    assert len((aside / "result.json").read_text()) == 10  # the damaged file, kept
    assert len((aside / "runs.log").read_text().splitlines()) == 1  # the first run's log, kept
    assert runs(sweep, victim) == 1 and runs(sweep, other) == 1  # run again from scratch; the other not


@pytest.mark.slurm
def test_two_launchers_at_once_do_not_double_submit(cluster, sweep):
    sweep.mkdir(parents=True)
    overrides = ("proxy.schedule=1", "train.seed=0,1,2,3")
    procs = [launch(sweep, *overrides, background=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    submitted = [line for out in outs for line in out.splitlines() if "(submitted as job" in line]
    assert len(submitted) == 4, outs  # each cell exactly once, by one launcher or the other
    jobs = {cid: record(sweep, cid) for cid in status(sweep)}
    assert len(jobs) == 4 and all(r["previous_jobs"] == [] for r in jobs.values())
    assert len({r["job_id"] for r in jobs.values()}) == 4


def node_cpus() -> int:
    out = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0].rstrip("+"))


def running_cells(arrays: list[str]) -> int:
    out = subprocess.run(["squeue", "-h", "-r", "-t", "RUNNING", "-o", "%i", "-j", ",".join(arrays)],
                         capture_output=True, text=True).stdout
    return len(out.split())


@pytest.mark.slurm
def test_cap_holds_over_several_arrays(cluster, sweep, tmp_path):
    """One slot fewer than the node's CPUs, two arrays: without the lanes the two arrays (each with the
    whole cap as %N) would fill every CPU."""
    cap = max(1, node_cpus() - 1)
    module, env = sleep_cell(tmp_path, seconds=4)
    seeds = cap + 1  # x2 with the paired baselines: two arrays of cap + 1 cells
    out = launch(sweep, f"train.seed=range(0,{seeds})", module, f"hydra.launcher.array_parallelism={cap}",
                 f"hydra.launcher.max_array_size={cap + 1}", env=env)
    arrays = [a.split()[0] for a in out.split("job arrays:", 1)[1].split(";")[0].split("), ")]
    assert len(arrays) >= 2, out
    assert f"at most {cap} cells run at once" in out, out
    peak, deadline = 0, time.time() + 300
    while time.time() < deadline:
        peak = max(peak, running_cells(arrays))
        left = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(arrays)],
                              capture_output=True, text=True).stdout.split()
        if not left:
            break
        time.sleep(0.2)
    assert peak == cap, f"{peak} cells ran at once under a cap of {cap}"
    cells = status(sweep)
    assert len(cells) == 2 * seeds and all(c["state"] == "DONE" for c in cells.values()), cells
    assert all(runs(sweep, cid) == 1 for cid in cells)


@pytest.mark.slurm
def test_local_launch_does_not_run_cells_queued_in_slurm(cluster, sweep, tmp_path):
    module, env = sleep_cell(tmp_path)
    launch(sweep, "train.seed=0", module, "+hydra.launcher.additional_parameters.hold=true", env=env)
    queued = wait_for(lambda: all_in(sweep, "PENDING"), 30, "the held jobs to be queued")
    proc = launch_local(sweep, "train.seed=0", module, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for cid, c in queued.items():
        assert f"cell {cid} is queued in Slurm as job {c['job_id']}; skipped" in proc.stdout, proc.stdout
        assert runs(sweep, cid) == 0
        held = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", c["job_id"].split("_")[0]],
                              capture_output=True, text=True).stdout
        assert f"{c['job_id']} PENDING" in held, held  # still queued for Slurm to run
    assert "Nothing to run here: 2 cells are queued or running in Slurm" in proc.stdout


@pytest.mark.slurm
def test_thesis_rehearsal_with_offline_cached_weights(cluster, sweep, tmp_path):
    """A thesis sweep as a cluster runs it, small: ``+sweep=thesis_thresholds`` (model.pretrained=true,
    p_trains) with shapes and test_resnet standing in for its dogs and ResNet/EfficientNet, its grid cut
    to one proxy cell and its baseline, through ``hydra/launcher=slurm_v100`` with the GPU request
    dropped for the CPU node (``gres=null``: no PROXYATTENTION_REQUIRE_GPU either). The hub is offline;
    the pretrained weights are a file the weights command put into an empty cache. Both cells end DONE
    and trained from exactly that file."""
    import safetensors.torch
    import timm
    import torch
    import yaml

    from launcher.cellstate import REQUIRE_GPU_ENV

    torch.manual_seed(123)  # an init no cell makes itself (cells seed 0): only loading it gives these
    seed = timm.create_model("test_resnet").state_dict()
    file = tmp_path / "test_resnet.safetensors"
    safetensors.torch.save_file(seed, str(file))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"),
           "HF_HUB_OFFLINE": "1"}
    for k in (REQUIRE_GPU_ENV, "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(k, None)
    run = lambda *args: subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env,  # noqa: E731
                                       text=True, capture_output=True, timeout=300)
    grid = ("launcher", "+sweep=thesis_thresholds", "dataset=shapes", "model=test_resnet", "train.seed=0",
            "proxy.threshold=0.4", "proxy.schedule=1,p,1", "explain.enabled=false",
            "hydra/launcher=slurm_v100", "hydra.launcher.gres=null", "hydra.launcher.mem_gb=null",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.heartbeat_s=2", f"hydra.sweep.dir={sweep}")

    refused = run(*grid)  # offline and nothing cached: refused before anything is submitted
    assert refused.returncode != 0 and "test_resnet" in refused.stderr, refused.stdout + refused.stderr
    assert not sweep.exists()
    fetched = run("proxyattention.data", "weights", "--from-file", f"test_resnet={file}")
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    cached = Path(fetched.stdout.strip().rsplit(": ", 1)[1])
    assert cached.is_file() and str(tmp_path / "hf" / "hub") in str(cached)

    t0 = time.monotonic()
    submit = run(*grid)
    assert submit.returncode == 0 and "submitted 2 of 2 cells" in submit.stdout, submit.stdout + submit.stderr
    cells = wait_for(lambda: all_in(sweep, "DONE", "FAILED", "CANCELLED", "TIMEOUT"), 300, "the rehearsal to end")
    print(f"rehearsal: 2 cells DONE through Slurm in {time.monotonic() - t0:.0f} s")
    assert {c["state"] for c in cells.values()} == {"DONE"}, cells
    scripts = "".join(s.read_text() for s in (sweep / "slurm").glob("*.sh"))
    assert "--gres" not in scripts and "--cpus-per-task=1" in scripts
    conv = [k for k, v in seed.items() if v.ndim == 4]
    p_trains = []
    for cid in cells:
        cell = sweep / "cells" / cid
        cfg = yaml.safe_load((cell / "config.yaml").read_text())
        assert cfg["model"]["name"] == "test_resnet" and cfg["model"]["pretrained"] is True
        assert cfg["dataset"]["name"] == "shapes"
        p_trains.append(cfg["proxy"].get("p_trains"))
        assert f"pretrained weights from {cached}" in (cell / "trial.log").read_text()
        trained = torch.load(cell / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
        # Three epochs move the weights a little: still the file's (a cell's own init gives ~0).
        similarity = torch.nn.functional.cosine_similarity(
            torch.cat([trained[k].flatten().float() for k in conv]), torch.cat([seed[k].flatten() for k in conv]),
            dim=0)
        assert similarity > 0.9, (cid, float(similarity))
    assert True in p_trains  # the saved sweep's setting reached the proxy cell
