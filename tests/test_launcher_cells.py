"""Sweeps of real cells (``python -m proxyattention.cell``) on the embedded digits with test_resnet.

Each cell is ~10-20 s on 2 cores, most of it ``import torch``; explainability metrics are off to keep
them short. Stand-in cells cover the pool's logic in test_launcher_local.py; these prove it with the
real thing: a sweep, re-issue, kill -9 of a cell and of the launcher with resume from the
checkpoint, a failing dataset fixed and rerun, two launchers at once, a timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from waiting import wait_for

pytestmark = pytest.mark.slow

FAST = ("dataset=digits", "model=test_resnet", "explain.enabled=false")


def launcher(tmp_path: Path, *overrides: str, background: bool = False, sweep: str = "sweep"):
    args = [sys.executable, "-m", "launcher", *FAST, *overrides, f"hydra.sweep.dir={tmp_path / sweep}",
            "hydra.launcher.heartbeat_s=1"]
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if background:
        return subprocess.Popen(args, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    return subprocess.run(args, cwd=tmp_path, env=env, text=True, capture_output=True, timeout=600)


def cells(sweep: Path) -> dict[str, dict]:
    out = subprocess.run([sys.executable, "-m", "launcher.status", str(sweep), "--json"], text=True,
                         capture_output=True, check=True).stdout
    return {c["id"]: c for c in json.loads(out)["cells"]}


def attempts_logged(cell: Path) -> int:
    return (cell / "stdout.log").read_text().count("===== attempt ")


def test_small_sweep_then_reissue_runs_nothing(tmp_path):
    overrides = ("proxy.schedule=1,p,1", "proxy.threshold=0.1,0.85", "hydra.launcher.workers=2")
    proc = launcher(tmp_path, *overrides)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = cells(tmp_path / "sweep")
    assert len(got) == 3  # two proxy cells and their one shared baseline
    roles = sorted(c["role"] for c in got.values())
    assert roles == ["baseline", "proxy", "proxy"]
    for c in got.values():
        assert c["state"] == "DONE" and c["attempts"] == 1
        result = json.loads((Path(c["dir"]) / "result.json").read_text())
        assert 0 <= result["metrics"]["test/acc"] <= 1
        assert (Path(c["dir"]) / "checkpoint.pt").exists() and (Path(c["dir"]) / "tb").is_dir()
    out = proc.stdout
    assert "proxy.threshold=0.1" in out and "[baseline]" in out and "sweep folder:" in out
    assert out.count("DONE ") >= 3  # state-change lines, then the summary table

    t0 = time.time()
    again = launcher(tmp_path, *overrides)
    assert again.returncode == 0
    assert "All 3 cells are DONE; nothing to run." in again.stdout
    assert time.time() - t0 < 30
    assert all(attempts_logged(Path(c["dir"])) == 1 for c in cells(tmp_path / "sweep").values())


def test_kill_cell_then_launcher_resumes_from_checkpoint(tmp_path):
    # One baseline cell of 6 epochs: long enough to be killed twice between checkpoints.
    args = ("proxy=none", "proxy.schedule=6")
    ckpt_epoch = lambda d: json.loads((d / "result.json").read_text())["resumed_from_epoch"]  # noqa: E731

    first = launcher(tmp_path, *args, background=True)
    status = wait_for(lambda: next(iter((tmp_path / "sweep").glob("cells/*/status.json")), None))
    cell = status.parent
    wait_for(lambda: (cell / "checkpoint.pt").exists())
    os.kill(json.loads(status.read_text())["pid"], signal.SIGKILL)  # kill -9 of the cell
    out, err = first.communicate(timeout=120)
    assert first.returncode == 1, out + err
    (c,) = cells(tmp_path / "sweep").values()
    assert c["state"] == "CANCELLED" and "SIGKILL" in c["error"]

    mtime = (cell / "checkpoint.pt").stat().st_mtime
    second = launcher(tmp_path, *args, background=True)
    wait_for(lambda: (cell / "checkpoint.pt").stat().st_mtime > mtime)  # resumed and saved an epoch
    second.kill()  # kill -9 of the launcher; its cell is orphaned
    second.communicate()
    (c,) = cells(tmp_path / "sweep").values()
    if c["state"] == "RUNNING":  # its cell process still lives: shown as orphaned until a re-issue takes it over
        assert c["error"].startswith("orphaned"), c
    else:  # the cell process ended with its launcher
        assert c["state"] == "CANCELLED" and c["interrupted"], c

    third = launcher(tmp_path, *args)
    assert third.returncode == 0, third.stdout + third.stderr
    (c,) = cells(tmp_path / "sweep").values()
    assert c["state"] == "DONE"
    log = (cell / "trial.log").read_text()
    if c["attempts"] == 3:  # the orphan was stopped and its work resumed from the checkpoint
        assert log.count("resuming from") == 2
        assert ckpt_epoch(cell) >= 2
    else:  # the orphan finished before the rerun looked: its result was adopted, not recomputed
        assert c["attempts"] == 2 and log.count("resuming from") == 1


def _image_folder(root: Path) -> None:
    import random

    from PIL import Image

    rng = random.Random(0)
    for k in range(3):
        (root / f"class{k}").mkdir(parents=True)
        for i in range(20):
            px = [(rng.randrange(256) // (k + 1),) * 3 for _ in range(16 * 16)]
            img = Image.new("RGB", (16, 16))
            img.putdata(px)
            img.save(root / f"class{k}" / f"{i}.png")


def test_failed_cell_then_fixed_and_rerun_failed_only(tmp_path):
    root = tmp_path / "images"
    _image_folder(root)
    bad = root / "class1" / "7.png"
    good = bad.read_bytes()
    bad.write_bytes(b"not a png" + b"\0" * (len(good) - 9))  # same size: the data's fingerprint is unchanged
    args = ("dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=32", "proxy=none",
            "proxy.schedule=1")
    proc = launcher(tmp_path, *args)
    assert proc.returncode == 1
    (c,) = cells(tmp_path / "sweep").values()
    assert c["state"] == "FAILED" and str(bad) in c["error"]
    assert "FAILED" in proc.stdout

    bad.write_bytes(good)
    fixed = launcher(tmp_path, *args, "hydra.launcher.rerun=failed")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    (c,) = cells(tmp_path / "sweep").values()
    assert c["state"] == "DONE" and c["attempts"] == 2


def test_two_launchers_at_once_run_each_cell_once(tmp_path):
    args = ("proxy.schedule=1,p,1", "proxy.threshold=0.4")
    a = launcher(tmp_path, *args, background=True)
    b = launcher(tmp_path, *args, background=True)
    out_a, err_a = a.communicate(timeout=600)
    out_b, err_b = b.communicate(timeout=600)
    assert a.returncode == 0 and b.returncode == 0, out_a + err_a + out_b + err_b
    got = cells(tmp_path / "sweep")
    assert len(got) == 2
    for c in got.values():
        assert c["state"] == "DONE" and c["attempts"] == 1
        assert attempts_logged(Path(c["dir"])) == 1


def test_timeout_marks_the_cell_and_kills_it(tmp_path):
    t0 = time.time()
    proc = launcher(tmp_path, "proxy=none", "proxy.schedule=50", "hydra.launcher.timeout_min=0.1")
    assert proc.returncode == 1
    assert time.time() - t0 < 60
    (c,) = cells(tmp_path / "sweep").values()
    assert c["state"] == "TIMEOUT"
    pid = c.get("pid")
    status = json.loads((Path(c["dir"]) / "status.json").read_text())
    assert not Path(f"/proc/{status['pid']}").exists() or pid is None
