"""Planning a sweep: composition through Hydra, paired baselines, cell ids, bad overrides, no torch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from proxyattention.sweep.plan import (
    Composer,
    PlanError,
    cached_plan,
    plan_sweep,
    snapshot_yaml,
    write_plan_files,
)
from omegaconf import OmegaConf

from launcher.plugin import sweep_name
from proxyattention.config import register_configs
from proxyattention.identity import cell_id
from proxyattention.schedule import quote_schedule_overrides

REPO = Path(__file__).resolve().parents[1]



def grid(**axes: list) -> list[list[str]]:
    jobs = [[]]
    for key, values in axes.items():
        jobs = [j + [f"{key}={v}"] for j in jobs for v in values]
    return jobs


def test_baselines_are_added_once_and_paired(composer_fn, tmp_path):
    jobs = grid(model=["test_resnet", "test_efficientnet"], **{"proxy.threshold": [0.1, 0.4, 0.85]})
    plan = plan_sweep(jobs, composer_fn, tmp_path)
    baselines = [c for c in plan.cells if c.record.role == "baseline"]
    proxies = [c for c in plan.cells if c.record.role == "proxy"]
    assert len(proxies) == 6 and len(baselines) == 2
    assert {p.record.baseline for p in proxies} == {b.id for b in baselines}
    for b in baselines:
        assert b.config["proxy"]["enabled"] is False and b.config["proxy"]["schedule"] == "4"
        assert "proxy=none" in b.record.overrides
    # A baseline runs right before the first cell that pairs with it.
    first = plan.cells.index(next(c for c in plan.cells if c.record.role == "proxy"))
    assert plan.cells[first - 1].record.role == "baseline"


def test_planning_shortcut_gives_hydras_configs_and_ids(composer_fn, tmp_path):
    jobs = grid(model=["test_resnet", "resnet18"], dataset=["digits", "shapes"],
                **{"proxy.weight": [0.2, 1], "train.seed": [0, 3], "proxy.mode": ["blend", "black"]})
    plan = plan_sweep(jobs, composer_fn, tmp_path)
    reference = Composer(composer_fn, fast=False)
    for job, cid in zip(jobs, plan.job_cells):
        plain = reference.trial(job)
        assert cell_id(OmegaConf.create(plain)) == cid
    by_id = {c.id: c for c in plan.cells}
    assert by_id[plan.job_cells[-1]].config == reference.trial(jobs[-1])
    assert by_id[plan.job_cells[-1]].config["proxy"]["weight"] == 1.0  # coerced as OmegaConf does


def test_target_true_is_the_word_on_both_planning_paths(composer_fn, tmp_path):
    """`explain.target=true` arrives as a YAML boolean: the shortcut and Hydra's path both spell it."""
    jobs = grid(**{"explain.target": ["true"], "proxy.target": ["true", "predicted"]})
    plan = plan_sweep(jobs, composer_fn, tmp_path)
    reference = Composer(composer_fn, fast=False)
    for job, cid in zip(jobs, plan.job_cells):
        config = {c.id: c for c in plan.cells}[cid].config
        assert config["explain"]["target"] == "true" and config == reference.trial(job)
        assert cell_id(OmegaConf.create(config)) == cid


@pytest.mark.parametrize("override, words", [
    ("model=resnet999", ["model=resnet999", "Could not find 'model/resnet999'"]),
    ("proxy.treshold=0.3", ["proxy.treshold"]),
    ("proxy.threshold=1.5", ["proxy.threshold=1.5", "out of range"]),
    ("proxy.threshold=abc", ["proxy.threshold=abc"]),
    ("proxy.mode=sideways", ["proxy.mode", "blend"]),
])
def test_bad_override_is_named(composer_fn, tmp_path, override, words):
    jobs = [["model=test_resnet"], ["model=test_resnet", override]]
    with pytest.raises(PlanError) as e:
        plan_sweep(jobs, composer_fn, tmp_path)
    for w in words:
        assert w in str(e.value)


def test_plan_files_and_cache(composer_fn, tmp_path):
    jobs = grid(**{"proxy.threshold": [0.1, 0.4]})
    plan = plan_sweep(jobs, composer_fn, tmp_path)
    assert write_plan_files(plan, ["proxy.threshold=0.1,0.4"], fingerprint="f1") == 3
    snap = tmp_path / "cells" / plan.job_cells[0] / "config.yaml"
    cfg = OmegaConf.load(snap)
    assert cfg.proxy.threshold == 0.1 and cfg.train.progress is False
    assert cell_id(cfg) == plan.job_cells[0]  # the snapshot names the same cell
    assert write_plan_files(plan, fingerprint="f1") == 0  # snapshots are written once
    again = cached_plan(tmp_path, jobs, "f1")
    assert again is not None and [c.id for c in again.cells] == [c.id for c in plan.cells]
    assert cached_plan(tmp_path, jobs, "f2") is None  # conf/ or code changed: plan again


def test_sweep_folder_name_is_deterministic():
    a = sweep_name(["model=a,b", "proxy.threshold=0.1"])
    assert a == sweep_name(["proxy.threshold=0.1", "model=a,b"])
    assert a != sweep_name(["model=a,b", "proxy.threshold=0.4"])
    assert a.startswith("model_proxy.threshold=0.1-")


def test_schedule_needs_no_quotes():
    assert quote_schedule_overrides(["proxy.schedule=5,p,4", "proxy.schedule=10,20",
                                     "proxy.schedule='1,p,1','2,p,2'"]) == [
        "proxy.schedule='5,p,4'", "proxy.schedule=10,20", "proxy.schedule='1,p,1','2,p,2'"]


# ---- through the command line (a process each; still no trial runs)


@pytest.mark.parametrize("override, words", [
    ("model=resnet999", ["model/resnet999"]),
    ("proxy.treshold=0.3", ["proxy.treshold"]),
    ("proxy.threshold=0.1,1.5", ["proxy.threshold=1.5", "out of range"]),
    ("proxy.schedule=5,q,3", ["proxy.schedule='5,q,3'", "token 'q'"]),
    ("train.seed=-1", ["train.seed=-1", "[0, 2**32)"]),
])
def test_cli_bad_override_fails_before_any_cell(run_module, tmp_path, override, words):
    sweep = tmp_path / "sweep"
    proc = run_module("launcher", "model=test_resnet", override, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode != 0
    for w in words:
        assert w in proc.stderr + proc.stdout
    assert not (sweep / "cells").exists()


def test_planning_never_imports_torch(tmp_path):
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['launcher', 'model=test_resnet,test_efficientnet', 'proxy.threshold=0.1,0.4', "
        f"'hydra.sweep.dir={tmp_path / 'sweep'}', 'hydra.launcher.dry_run=true']\n"
        "try:\n    runpy.run_module('launcher', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision'))\n"
        "print('HEAVY', heavy)\n"
        "assert 'proxyattention.sweep.plan' in sys.modules and 'launcher.local' in sys.modules\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "HEAVY []" in proc.stdout
    assert "would run" in proc.stdout
    assert not (tmp_path / "sweep" / "cells").exists()  # a dry run writes no cells


def test_cfg_job_shows_the_config(run_module, tmp_path):
    proc = run_module("launcher", "--cfg", "job", "model=test_resnet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "name: test_resnet" in proc.stdout


def test_status_of_a_synthetic_sweep(run_module, tmp_path, composer_fn):
    from launcher import cellstate
    from launcher.cellstate import CellState, CellStatus, Owner

    plan = plan_sweep(grid(**{"proxy.threshold": [0.1, 0.4]}), composer_fn, tmp_path)
    write_plan_files(plan)
    done, failed, _ = [plan.cell_dir(c.id) for c in plan.cells]
    s = CellStatus().started_by(Owner.this_process(), pid=1)
    (done / "result.json").write_text(json.dumps({"status": "done", "metrics": {"test/acc": 0.75}}))  # DONE needs it
    cellstate.write_status(done, dataclasses.replace(s.finished(CellState.DONE, exit_code=0,
                                                               metrics={"test/acc": 0.75}), job_id="4242_0"))
    cellstate.write_status(failed, s.finished(CellState.FAILED, exit_code=1, error="Traceback\nValueError: bad"))
    proc = run_module("launcher.status", str(tmp_path), "--json", cwd=tmp_path, check=True)
    out = json.loads(proc.stdout)
    assert out["counts"] == {"PENDING": 1, "RUNNING": 0, "DONE": 1, "FAILED": 1, "TIMEOUT": 0, "CANCELLED": 0,
                             "DAMAGED": 0}
    assert {"id", "state", "overrides", "attempts", "dir"} <= set(out["cells"][0])
    assert [c["state"] for c in out["cells"]] == ["DONE", "FAILED", "PENDING"]
    assert [c["job_id"] for c in out["cells"]] == ["4242_0", None, None]
    text = run_module("launcher.status", str(tmp_path), cwd=tmp_path, check=True).stdout
    assert "ValueError: bad" in text and "0.7500" in text and "DONE job 4242_0" in text and "1 DONE, 1 FAILED" in text.replace("1 PENDING, ", "")


def test_the_same_sweep_planned_under_two_homes_has_the_same_ids(tmp_path):
    """dataset.root defaults to $HOME/data/...: no machine path may enter a cell id."""
    import os
    import re

    from PIL import Image

    listed = []
    for home in ("home-a", "home-b"):
        for k in range(2):  # the same two-class images under each home's default dataset root
            folder = tmp_path / home / "data" / "stanford_dogs" / f"breed{k}"
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (40 * k + i, 0, 0)).save(folder / f"{i}.png")
        env = {**os.environ, "HOME": str(tmp_path / home)}
        env.pop("PROXYATTENTION_DATA", None)
        env.pop("PROXYATTENTION_CACHE", None)
        proc = subprocess.run(
            [sys.executable, "-m", "launcher", "-m", "dataset=stanford_dogs", "dataset.num_classes=2", "model=test_resnet",
             "proxy.threshold=0.1,0.4", "hydra.launcher.dry_run=true", f"hydra.sweep.dir={tmp_path / home / 'sweep'}"],
            cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # Each cell's line starts with its 12-hex id.
        ids = [m.group(1) for line in proc.stdout.splitlines() if (m := re.match(r"([0-9a-f]{12})\s", line))]
        listed.append(sorted(ids))
    assert len(listed[0]) == 3  # two proxy cells and their shared baseline
    assert listed[0] == listed[1]


@pytest.mark.parametrize("value_overrides", [
    ["train.seed=7", "proxy.threshold=1", "proxy.weight=0.25"],
    ["train.seed=+3", "proxy.threshold=0.10", "proxy.weight=1.0"],
    ["train.seed=-0", "proxy.threshold=.5", "proxy.subset=1e-1"],
    ["train.seed=007"],
    ["proxy.threshold=2"],
    ["train.seed=1.5"],
])
def test_the_number_shortcut_reads_values_as_hydra_does(composer_fn, value_overrides):
    """Plain ``group.key=<number>`` overrides skip Hydra's grammar: same value (type included), or the same
    refusal, as composing through Hydra."""
    fast, slow = Composer(composer_fn), Composer(composer_fn, fast=False)
    job = ["model=test_resnet", *value_overrides]

    def outcome(composer: Composer):
        try:
            cfg = composer.trial(job)
        except PlanError:
            return "refused"
        return {k: (v, type(v)) for g in cfg.values() for k, v in g.items()}

    assert outcome(fast) == outcome(slow)


def test_snapshots_are_the_yaml_of_their_config(composer_fn, tmp_path):
    jobs = grid(**{"proxy.threshold": [0.1, 0.85], "train.seed": [0, 12345]})
    plan = plan_sweep(jobs, composer_fn, tmp_path)
    for cell in plan.cells:
        text = snapshot_yaml(cell.config)
        expected = {g: dict(v) for g, v in cell.config.items()}
        expected["train"]["progress"] = False
        assert yaml.safe_load(text) == expected
        assert text == yaml.safe_dump(expected, sort_keys=False, default_flow_style=False)
    odd = {"dataset": {"root": "a long value with: colons # and hashes " * 4, "name": "yes"}, "train": {"progress": True}}
    assert yaml.safe_load(snapshot_yaml(odd)) == {"dataset": odd["dataset"], "train": {"progress": False}}
