"""Cells on data read from a root are named by what the data is (its content fingerprint), not by where it
lives; bad datasets and dataset values are refused before any cell starts; the trial refuses data that
changed since its cell was planned."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from proxyattention.sweep.plan import PlanError, cached_plan, plan_sweep, write_plan_files
from omegaconf import OmegaConf
from PIL import Image

from proxyattention import identity
from proxyattention.config import (
    ConfigError,
    DatasetConfig,
    TrialConfig,
    register_configs,
    to_trial_config,
)
from proxyattention.data import facts, listing
from proxyattention.data.registry import SOURCES, load_samples
from proxyattention.data.samples import DataError

REPO = Path(__file__).resolve().parents[1]



@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROXYATTENTION_CACHE", str(tmp_path / "cache"))


def image_folder(root: Path, classes: int, per_class: int = 4, seed: int = 0, age: bool = True) -> Path:
    """``root/c<k>/<i>.png``; ``age``: folders and files dated an hour back, so their listing is cached."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / f"c{k}" / f"{i}.png")
    if age:
        age_tree(root)
    return root


def age_tree(root: Path) -> None:
    old = time.time() - 3600
    for dirpath, _, files in os.walk(root):
        for f in files:
            os.utime(os.path.join(dirpath, f), (old, old))
        os.utime(dirpath, (old, old))


def jobs_on(root: Path, *extra: str) -> list[list[str]]:
    return [["dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=32", "model=test_resnet",
             "proxy.schedule='1,p,1'", f"proxy.threshold={t}", *extra] for t in (0.1, 0.4)]


def dataset_cfg(root: Path, tmp_path: Path, **kw) -> DatasetConfig:
    return OmegaConf.merge(OmegaConf.structured(DatasetConfig),
                           {"name": "imagefolder", "source": "imagefolder", "root": str(root),
                            "cache_dir": str(tmp_path / "cache"), **kw})


# --- 1. ids name the data -----------------------------------------------------------------------------

def test_another_folder_of_the_same_name_is_another_cell_and_a_copy_is_the_same(composer_fn, tmp_path):
    a = image_folder(tmp_path / "a" / "good", classes=2)
    b = image_folder(tmp_path / "b" / "good", classes=3, seed=1)
    copy = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(a, copy)
    plans = {name: plan_sweep(jobs_on(root), composer_fn, tmp_path / name)
             for name, root in (("a", a), ("b", b), ("copy", copy))}
    ids = {name: {c.id for c in p.cells} for name, p in plans.items()}
    assert len(ids["a"]) == 3 and not ids["a"] & ids["b"]  # other images under the same folder name
    assert ids["copy"] == ids["a"]  # the same images elsewhere, under another name: the same cells
    fp = {c.config["dataset"]["fingerprint"] for c in plans["a"].cells}
    assert fp == {load_samples(dataset_cfg(a, tmp_path)).fingerprint}  # the trial's own fingerprint


def test_the_planned_id_is_the_one_the_trial_and_the_table_compute(composer_fn, tmp_path):
    root = image_folder(tmp_path / "data", classes=2)
    plan = plan_sweep(jobs_on(root), composer_fn, tmp_path / "sweep")
    write_plan_files(plan, fingerprint="f1")
    for cell in plan.cells:
        snap = OmegaConf.load(tmp_path / "sweep" / "cells" / cell.id / "config.yaml")
        assert snap.dataset.fingerprint and len(snap.dataset.fingerprint) == 16
        trial = to_trial_config(snap)  # what the cell's trial computes its id from (train.set_up)
        assert identity.cell_id(trial) == cell.id
        assert identity.ids(identity.complete(OmegaConf.to_container(snap)))[0] == cell.id  # results table


def test_ids_change_once_and_only_for_data_read_from_a_root():
    base = OmegaConf.to_container(OmegaConf.structured(TrialConfig), resolve=True)
    with_data = lambda **d: {**base, "dataset": {**base["dataset"], **d}}  # noqa: E731
    # Pinned: fingerprints leave these ids alone (they changed once, with the EigenGradCAM orientation
    # marker of the default explain.method).
    assert identity.cell_id(base) == "d0e870306620"  # digits
    assert identity.cell_id(with_data(name="shapes", source="shapes")) == "df1647bc26cd"
    folder = dict(name="imagefolder", source="imagefolder", image_size=32)
    old = with_data(root="/data/good", **folder)  # a snapshot planned before: no fingerprint
    assert identity.cell_id(old) == "5dbec1dd1e39"
    new = identity.cell_id(with_data(root="/data/good", fingerprint="0123456789abcdef", **folder))
    assert new != identity.cell_id(old)
    assert new == identity.cell_id(with_data(root="/mnt/x/other_name", fingerprint="0123456789abcdef", **folder))
    assert new != identity.cell_id(with_data(root="/data/good", fingerprint="fedcba9876543210", **folder))


def test_a_sweep_reissued_after_its_data_changed_plans_new_cells(composer_fn, tmp_path):
    root = image_folder(tmp_path / "data", classes=2)
    jobs = jobs_on(root)
    plan = plan_sweep(jobs, composer_fn, tmp_path / "sweep")
    write_plan_files(plan, fingerprint="f1")
    assert cached_plan(tmp_path / "sweep", jobs, "f1") is not None
    Image.new("RGB", (12, 12)).save(root / "c1" / "new.png")
    assert cached_plan(tmp_path / "sweep", jobs, "f1") is None  # the recorded plan no longer holds
    again = plan_sweep(jobs, composer_fn, tmp_path / "sweep")
    assert not {c.id for c in again.cells} & {c.id for c in plan.cells}


# --- the listing cache --------------------------------------------------------------------------------

def test_the_listing_is_reused_until_the_folder_changes(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "data", classes=2)
    cfg = dataset_cfg(root, tmp_path)
    first = facts.dataset_facts(cfg)
    assert listing.listing_path(cfg).is_file()
    assert (first.classes, first.images) == (["c0", "c1"], 8)

    def no_loading(*a, **k):
        raise AssertionError("the folder was read again")

    monkeypatch.setattr("proxyattention.data.sources.load_imagefolder", no_loading)
    assert facts.dataset_facts(cfg) == first  # stamps held: nothing read
    monkeypatch.undo()
    monkeypatch.setenv("PROXYATTENTION_CACHE", str(tmp_path / "cache"))
    (root / "c0" / "0.png").write_bytes((root / "c0" / "0.png").read_bytes() + b"\0")  # rewritten in place
    changed = facts.dataset_facts(cfg)
    assert changed.fingerprint != first.fingerprint
    assert changed.fingerprint == load_samples(cfg).fingerprint


def test_a_folder_changed_just_now_is_not_cached(tmp_path):
    root = image_folder(tmp_path / "data", classes=2, age=False)
    facts.dataset_facts(dataset_cfg(root, tmp_path))
    assert not listing.listing_path(dataset_cfg(root, tmp_path)).exists()  # a coarse clock could hide a change


def test_verify_records_the_listing_planning_reads(tmp_path):
    from proxyattention.data import cli

    root = image_folder(tmp_path / "data", classes=2)
    cfg = dataset_cfg(root, tmp_path)
    cli.verify(cfg, progress=False, per_class=False, out=open(os.devnull, "w"))
    hit = listing.cached(cfg, SOURCES["imagefolder"].loader)
    assert hit is not None and hit.fingerprint == load_samples(cfg).fingerprint


# --- the trial ------------------------------------------------------------------------------------------

def test_the_trial_refuses_data_that_changed_since_its_cell_was_planned(tmp_path):
    root = image_folder(tmp_path / "data", classes=2)
    planned = facts.dataset_facts(dataset_cfg(root, tmp_path)).fingerprint
    cfg = dataset_cfg(root, tmp_path, fingerprint=planned)
    assert load_samples(cfg).fingerprint == planned
    assert listing.listing_path(cfg).is_file()
    Image.new("RGB", (12, 12)).save(root / "c0" / "new.png")
    with pytest.raises(DataError, match="dataset.fingerprint=.*changed since this cell was planned"):
        load_samples(cfg)
    assert not listing.listing_path(cfg).exists()  # planning reads the folder again


def test_one_class_is_refused_by_the_trial_too(tmp_path):
    root = image_folder(tmp_path / "data", classes=1)
    with pytest.raises(DataError, match="1 class with images .c0.; a classifier needs at least 2"):
        load_samples(dataset_cfg(root, tmp_path))


# --- 7. refused at planning, once per dataset -----------------------------------------------------------

def test_bad_data_is_refused_once_per_dataset_before_any_cell(composer_fn, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text" / "c0").mkdir(parents=True)
    (tmp_path / "text" / "c0" / "notes.txt").write_text("x")
    one = image_folder(tmp_path / "one", classes=1)
    for root, words in ((tmp_path / "missing", "is not a folder"), (tmp_path / "empty", "no images found"),
                        (tmp_path / "text", "notes.txt"), (one, "at least 2")):
        with pytest.raises(PlanError) as e:
            plan_sweep(jobs_on(root), composer_fn, tmp_path / "sweep")
        msg = str(e.value)
        assert msg.count(f"dataset.root='{root}'") == 1 and words in msg, msg
        assert "more bad jobs" not in msg  # both jobs read that dataset: said once
    assert not (tmp_path / "sweep").exists()


def test_a_wrong_class_count_or_fingerprint_is_refused_at_planning(composer_fn, tmp_path):
    root = image_folder(tmp_path / "data", classes=2)
    with pytest.raises(PlanError, match="dataset.num_classes=5 but .* has 2 classes"):
        plan_sweep(jobs_on(root, "dataset.num_classes=5"), composer_fn, tmp_path / "sweep")
    with pytest.raises(PlanError, match="dataset.fingerprint=0123456789abcdef but"):
        plan_sweep(jobs_on(root, "dataset.fingerprint=0123456789abcdef"), composer_fn, tmp_path / "sweep")
    with pytest.raises(PlanError, match="dataset.fingerprint=.*reads no folder"):
        plan_sweep([["model=test_resnet", "dataset.fingerprint=0123456789abcdef"]], composer_fn, tmp_path / "s")


@pytest.mark.parametrize("key, value, words", [
    ("image_size", 100000, "dataset.image_size=100000 is too large; use at most 4096"),
    ("image_size", 4097, "dataset.image_size=4097"),
    ("name", "../../x", "dataset.name='../../x' is not a plain name"),
    ("name", "a/b", "dataset.name='a/b'"),
    ("name", "..", "dataset.name='..'"),
    ("name", ".", "dataset.name='.'"),
    ("name", "", "dataset.name=''"),
    ("fingerprint", "../x", "dataset.fingerprint='../x'"),
])
def test_dataset_values_that_cannot_run_are_refused(key, value, words):
    with pytest.raises(ConfigError) as e:
        to_trial_config({"dataset": {key: value}})
    assert words in str(e.value)


def test_plain_names_and_sizes_up_to_the_bound_pass():
    cfg = to_trial_config({"dataset": {"name": "my-data_v1.2", "image_size": 4096}})
    assert cfg.dataset.name == "my-data_v1.2"


# --- a torchvision-backed source: read in a subprocess, the same fingerprint as the trial's ---------------

def test_a_torchvision_dataset_is_fingerprinted_like_the_trial_does(composer_fn, tmp_path):
    categories = tmp_path / "cal" / "caltech101" / "101_ObjectCategories"
    for name in ("BACKGROUND_Google", "ant", "bee"):
        (categories / name).mkdir(parents=True)
        for i in range(1, 4):
            Image.new("RGB", (12, 12), (i * 40, 0, 0)).save(categories / name / f"image_{i:04d}.jpg")
    jobs = [["dataset=caltech101", f"dataset.root={tmp_path / 'cal'}", "dataset.num_classes=2",
             "dataset.image_size=32", "model=test_resnet", "proxy=none"]]
    plan = plan_sweep(jobs, composer_fn, tmp_path / "sweep")
    (cell,) = plan.cells
    cfg = OmegaConf.merge(OmegaConf.structured(DatasetConfig), cell.config["dataset"])
    assert load_samples(cfg).fingerprint == cell.config["dataset"]["fingerprint"]  # and the check passes


# --- through the launcher: the second folder's cells run ---------------------------------------------------

def test_a_sweep_on_another_folder_of_the_same_name_trains_its_own_cells(fake, tmp_path):
    env = {"PROXYATTENTION_CACHE": str(tmp_path / "cache")}
    a = image_folder(tmp_path / "a" / "good", classes=2)
    b = image_folder(tmp_path / "b" / "good", classes=3, seed=1)
    args = ("dataset=imagefolder", "dataset.image_size=32", "proxy.schedule=1,p,1", "proxy.threshold=0.1")
    first = fake(*args, f"dataset.root={a}", env=env)
    assert first.returncode == 0 and "2 DONE" in first.stdout, first.stdout + first.stderr
    second = fake(*args, f"dataset.root={b}", env=env, sweep_dir=tmp_path / "sweep_b")
    assert second.returncode == 0, second.stdout + second.stderr
    from fakecell import cells, runs

    done_b = cells(tmp_path / "sweep_b")
    assert len(done_b) == 2 and not set(done_b) & set(cells(fake.sweep))
    assert all(runs(tmp_path / "sweep_b", cid) == 1 for cid in done_b)  # trained, not reused
