"""The Slurm backend against a real single-node Slurm (``bash .ci/slurm.sh up``), plus its pure parts.

Cluster tests (marked ``slurm``) skip with the reason when no cluster answers; with
``PROXYATTENTION_REQUIRE_SLURM=1`` (set by ``.ci/run``) a missing cluster is a failure instead.
Cells are real (``python -m proxyattention.cell``) on the embedded digits with test_resnet at 16 px,
one CPU each; the test node has ``nproc`` CPUs, so at most that many cells run at once. Every test
cancels the jobs it submitted, so a failure leaves no queue behind for the next one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
from waiting import wait_for as _wait_for


def wait_for(pred, timeout: float, what: str):
    """Poll every 2 s: each poll may ask squeue/sacct."""
    return _wait_for(pred, timeout, what, step=2.0)

from launcher.slurm import SlurmOptions, chunks, sbatch_script
from launcher.slurm_state import SlurmRecord, view
from proxyattention.cellstate import CellState, CellStatus

REPO = Path(__file__).resolve().parents[1]
CHEAP = ("dataset=digits", "model=test_resnet", "explain.enabled=false", "dataset.image_size=16",
         "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.heartbeat_s=2")
REQUIRE_ENV = "PROXYATTENTION_REQUIRE_SLURM"


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


def launch(sweep: Path, *overrides: str, background: bool = False):
    args = [sys.executable, "-m", "launcher", *CHEAP, *overrides, f"hydra.sweep.dir={sweep}"]
    if background:
        return subprocess.Popen(args, cwd=sweep.parent, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    proc = subprocess.run(args, cwd=sweep.parent, text=True, capture_output=True, timeout=300)
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
        # 60 epochs (> 75 s of training even on an idle core) cannot finish inside one minute.
        launch(on, "proxy.schedule=60", *common, "hydra.launcher.max_requeues=10")
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
    arrays = out.split("job arrays:", 1)[1].splitlines()[0]
    assert arrays.count("(") == 2, out  # 3 + 1: chunked below max_array_size
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
    assert any("#SBATCH --array=0-2%2" in s for s in scripts), scripts  # the 3-cell chunk, 2 at a time
    again = launch(sweep, "proxy.schedule=1", "train.seed=0,1", "train.max_lr=0.001,0.002")
    assert "All 4 cells are DONE; nothing to submit" in again


@pytest.mark.slurm
def test_raising_cell_is_failed_with_its_traceback(cluster, sweep, tmp_path):
    launch(sweep, "dataset=imagefolder", f"dataset.root={tmp_path / 'missing'}", "proxy.schedule=1")
    cells = wait_for(lambda: all_in(sweep, "FAILED", "DONE", "CANCELLED", "TIMEOUT"), 120, "the cell to end")
    (c,) = cells.values()
    assert c["state"] == "FAILED"
    assert "Traceback" in c["error"] or 'File "' in c["error"], c["error"]
    assert "DataError" in c["error"] and "missing" in c["error"]
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
