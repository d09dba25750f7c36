"""The sweep command as Hydra users drive it: flags, refusals before any cell starts (one line, nothing
written), what a dry run or a DONE re-issue leaves on disk, per-job folders of Hydra's own launchers,
job callbacks, and the one summary of a batched sweep. Cells are the torch-free stand-in (fakecell.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fakecell import cells

from launcher.plugin import sweep_name


def launcher(*args: str, cwd: Path, env: dict | None = None, module: str = "launcher") -> subprocess.CompletedProcess:
    full = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full, text=True,
                          capture_output=True, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Failed, said so in one message naming ``needles``, without a traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "HYDRA_FULL_ERROR" not in ln]
    assert 1 <= len(lines) <= 3, proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr


def tree(root: Path) -> dict[str, tuple[float, bytes]]:
    """Every file under ``root`` (links followed) with its mtime and content."""
    out = {}
    for dirpath, _, files in os.walk(root, followlinks=True):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = (p.stat().st_mtime_ns, p.read_bytes())
    return out


# --- Hydra's flags through the wrapper -------------------------------------------------------------

@pytest.mark.parametrize("flags, expect", [
    (["--info"], "Config search path"),
    (["-i"], "Config search path"),
    (["--info=searchpath"], "Config search path"),
    (["--info", "searchpath"], "proxyattention-sweeps"),
    (["--cfg=job"], "image_size:"),
    (["-cjob", "model=test_resnet"], "name: test_resnet"),
    (["--cfg", "job", "proxy.threshold=0.3"], "threshold: 0.3"),
])
def test_hydra_flags_work(flags, expect, tmp_path):
    proc = launcher(*flags, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert expect in proc.stdout
    assert not (tmp_path / "outputs").exists()


def test_run_flag_is_explained_in_one_line(tmp_path):
    proc = launcher("--run", "model=test_resnet", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "python -m proxyattention.train" in proc.stderr


def test_without_an_installed_app_the_command_says_how_to_install_it(monkeypatch, capsys):
    """An editable install made before the app registered itself (launcher.apps) lacks its entry point."""
    from launcher import __main__ as command
    from launcher import apps

    assert command.command_app().name == "proxyattention"  # this checkout, installed
    monkeypatch.setattr(apps, "installed", lambda: ())
    with pytest.raises(SystemExit) as e:
        command.command_app()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "pip install -e ." in err and apps.GROUP in err and "hydra/launcher=local" in err


def test_a_launcher_that_is_not_ours_is_refused(tmp_path):
    proc = launcher("hydra/launcher=basic", "model=test_resnet", f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    one_line_error(proc, "the launcher's own launchers", "proxyattention.train -m")
    assert not (tmp_path / "s").exists()


# --- refused before any cell starts, nothing written -----------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    (["proxy.threshold=interval(0.1,0.5)"], "hydra/sweeper=optuna"),
    (["hydra.launcher.workers=0"], "hydra.launcher.workers"),
    (["hydra.launcher.timeout_min=-3"], "hydra.launcher.timeout_min"),
    (["hydra.launcher.rerun=bogus"], "hydra.launcher.rerun"),
    (["hydra.launcher.list_rows=-1"], "hydra.launcher.list_rows"),
    (["hydra.launcher.objective=test/acc"], "hydra.launcher.objective"),
    (["train.seed=-1"], "train.seed"),
    (["model.name=resnet_nope"], "model.name='resnet_nope' is not a timm model"),
    (["model.target_layer=nope.layer"], "model.target_layer='nope.layer' is not a module"),
    (["model.target_layer=layer4"], "constant CAM"),
])
def test_bad_input_is_one_error_naming_the_key_and_nothing_is_written(overrides, key, tmp_path):
    sweep = tmp_path / "sweep"
    proc = launcher("model=test_resnet", *overrides, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    one_line_error(proc, key)
    assert not sweep.exists()
    assert not any(Path(os.environ["PROXYATTENTION_STORE"]).iterdir())


@pytest.mark.parametrize("data, overrides, needles", [
    ("missing", ["proxy.threshold=0.1,0.4"], ["dataset.root=", "is not a folder"]),
    ("empty", ["proxy.threshold=0.1,0.4"], ["dataset.root=", "no images found"]),
    ("text", ["proxy.threshold=0.1,0.4"], ["dataset.root=", "no images found", "notes.txt"]),
    ("one class", ["proxy.threshold=0.1,0.4"], ["dataset.root=", "1 class with images", "at least 2"]),
    ("two classes", ["dataset.image_size=100000"], ["dataset.image_size=100000", "at most 4096"]),
    ("two classes", ["dataset.name=../../x"], ["dataset.name='../../x'", "plain name"]),
])
def test_bad_data_is_one_error_naming_the_key_and_nothing_is_written(data, overrides, needles, tmp_path):
    """Checked when planned, once per dataset (two jobs on a bad folder: one error), before any cell."""
    from PIL import Image

    root = tmp_path / "data"
    if data != "missing":
        root.mkdir()
    if data == "text":
        (root / "c0").mkdir()
        (root / "c0" / "notes.txt").write_text("not an image")
    for k in range({"one class": 1, "two classes": 2}.get(data, 0)):
        (root / f"c{k}").mkdir()
        for i in range(3):
            Image.new("RGB", (12, 12), (60 * k, 20 * i, 0)).save(root / f"c{k}" / f"{i}.png")
    sweep = tmp_path / "sweep"
    proc = launcher("dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=32", "model=test_resnet",
                    "proxy.schedule=1,p,1", *overrides, f"hydra.sweep.dir={sweep}", cwd=tmp_path,
                    env={"PROXYATTENTION_CACHE": str(tmp_path / "cache")})
    one_line_error(proc, *needles)
    assert not sweep.exists()
    assert not any(Path(os.environ["PROXYATTENTION_STORE"]).iterdir())
    assert {p.name for p in tmp_path.iterdir()} <= {"data", "cache"}  # no split file, here or above
    assert not (tmp_path / "cache" / "splits").exists()


def test_the_trial_entry_point_refuses_a_bad_model_before_any_cell(tmp_path):
    sweep = tmp_path / "sweep"
    proc = launcher("-m", "model=test_resnet", "model.name=resnet_nope", f"hydra.sweep.dir={sweep}",
                    cwd=tmp_path, module="proxyattention.train")
    one_line_error(proc, "model.name='resnet_nope'", "did you mean")
    assert not sweep.exists()


def test_an_unwritable_sweep_folder_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    proc = launcher("model=test_resnet", f"hydra.sweep.dir={tmp_path / 'a_file' / 'sweep'}", cwd=tmp_path)
    one_line_error(proc, "hydra.sweep.dir=", "cannot be written")


def test_slurm_without_slurm_is_one_line(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    sweep = tmp_path / "sweep"
    proc = launcher("hydra/launcher=slurm", "model=test_resnet", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
                    env={"PATH": str(empty)})
    one_line_error(proc, "no sbatch", "hydra.launcher.dry_run=true")
    assert not sweep.exists()


# --- what is written, and when ---------------------------------------------------------------------

def test_a_dry_run_writes_nothing_and_caps_its_listing(tmp_path):
    sweep = tmp_path / "sweep"
    proc = launcher("model=test_resnet", "train.seed=range(0,50)", "hydra.launcher.dry_run=true",
                    f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not sweep.exists() and not any(Path(os.environ["PROXYATTENTION_STORE"]).iterdir())
    assert "dry run: 100 of 100 cells would run" in proc.stdout
    assert len(proc.stdout.splitlines()) < 70 and "… and 40 more cells (40 of them would run)" in proc.stdout
    full = launcher("model=test_resnet", "train.seed=range(0,50)", "hydra.launcher.dry_run=true",
                    "hydra.launcher.list_rows=0", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert len(full.stdout.splitlines()) > 100


@pytest.mark.floors
def test_a_done_reissue_writes_nothing_and_cells_carry_hydra_metadata(fake, tmp_path):
    first = fake("proxy.threshold=0.1,0.4")
    assert first.returncode == 0, first.stdout + first.stderr
    multirun = yaml.safe_load((fake.sweep / "multirun.yaml").read_text())
    assert multirun["hydra"]["overrides"]["task"][-1] == "proxy.threshold=0.1,0.4"  # the sweep's definition
    cell = next(c for c in (fake.sweep / "cells").iterdir() if "0.4" in (c / ".hydra" / "overrides.yaml").read_text())
    assert yaml.safe_load((cell / ".hydra" / "overrides.yaml").read_text()) == ["model=test_resnet",
                                                                               "proxy.threshold=0.4"]
    assert (cell / ".hydra" / "config.yaml").read_text() == (cell / "config.yaml").read_text()
    store = Path(os.environ["PROXYATTENTION_STORE"])
    before = tree(fake.sweep), tree(store)
    again = fake("proxy.threshold=0.1,0.4")
    assert again.returncode == 0 and "All 3 cells are DONE" in again.stdout
    assert (tree(fake.sweep), tree(store)) == before


def test_status_refuses_a_folder_that_is_not_a_sweep(run_module, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    proc = run_module("launcher.status", str(tmp_path / "notes"), cwd=tmp_path)
    assert proc.returncode == 2 and "is not a sweep folder" in proc.stderr and "PENDING" not in proc.stdout


def test_batches_print_one_summary_and_one_exit_code(fake):
    proc = fake("proxy.threshold=0.1,0.4,0.8", "hydra.sweeper.max_batch_size=1", env={"FAKE_FAIL": "0.4"})
    assert proc.returncode == 1
    headers = [ln for ln in proc.stdout.splitlines() if ln.startswith("cell ") and "overrides" in ln]
    assert len(headers) == 1 and proc.stdout.count("4 cells: 3 DONE, 1 FAILED") == 1, proc.stdout
    assert proc.stderr.count("not every cell of this sweep is DONE") == 1


# --- Hydra's own launchers and callbacks -----------------------------------------------------------

CALLBACK = '''
import json, os
from hydra.experimental.callback import Callback

class Recorder(Callback):
    def _write(self, what, config, **kw):
        with open(os.environ["CALLBACK_LOG"], "a") as f:
            f.write(json.dumps({"what": what, "id": str(config.hydra.job.id),
                                "threshold": config.proxy.threshold, "enabled": config.proxy.enabled,
                                "dir": config.hydra.runtime.output_dir, **kw}) + "\\n")

    def on_job_start(self, config, **kwargs):
        self._write("start", config)

    def on_job_end(self, config, job_return, **kwargs):
        self._write("end", config, status=job_return.status.name)
'''


def test_hydra_job_callbacks_fire_for_each_cell(fake, tmp_path):
    (tmp_path / "fakecell" / "recorder.py").write_text(CALLBACK)
    log = tmp_path / "callbacks.jsonl"
    proc = fake("proxy.threshold=0.1,0.4", "+hydra.callbacks.rec._target_=recorder.Recorder",
                env={"CALLBACK_LOG": str(log), "FAKE_FAIL": "0.4"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    events = [json.loads(ln) for ln in log.read_text().splitlines()]
    ids = set(cells(fake.sweep))
    assert sorted(e["what"] for e in events) == ["end"] * 3 + ["start"] * 3
    assert {e["id"] for e in events} == ids
    ends = {e["threshold"] if e["enabled"] else "baseline": e["status"] for e in events if e["what"] == "end"}
    assert ends == {0.1: "COMPLETED", 0.4: "FAILED", "baseline": "COMPLETED"}
    assert all(Path(e["dir"]).name == e["id"] for e in events)


@pytest.mark.slow
def test_hydra_basic_launcher_gives_each_job_its_own_folder(tmp_path):
    """Through python -m proxyattention.train -m, Hydra's own launcher runs trials in-process: each in
    hydra.sweep.dir/<job number> with its .hydra/ metadata; a failed job fails the command, after the rest."""
    sweep = tmp_path / "sweep"
    common = ["-m", "hydra/launcher=basic", "model=test_resnet", "proxy=none", "proxy.schedule=1",
              "explain.enabled=false", f"hydra.sweep.dir={sweep}"]
    proc = launcher(*common, "train.seed=0,1", cwd=tmp_path, module="proxyattention.train")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for num, seed in (("0", 0), ("1", 1)):
        job = sweep / num
        assert json.loads((job / "result.json").read_text())["status"] == "done"
        assert yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())[-1] == f"train.seed={seed}"
    assert (sweep / "multirun.yaml").exists()
    bad_dir = tmp_path / "bad"
    bad = launcher(*common[:-1], "model.name=resnet_nope,test_resnet", f"hydra.sweep.dir={bad_dir}",
                   cwd=tmp_path, module="proxyattention.train")
    assert bad.returncode == 1, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert "resnet_nope" in json.loads((bad_dir / "0" / "error.json").read_text())["error"]
    assert json.loads((bad_dir / "1" / "result.json").read_text())["status"] == "done"  # ran after the failure


def test_the_default_folder_name_counts_yaml_params_and_the_config_name():
    base = sweep_name(["model=a,b"])
    assert base == sweep_name(["model=a,b"], "config", None)
    assert base != sweep_name(["model=a,b"], "config", {"proxy.threshold": "0.1,0.4"})
    assert base != sweep_name(["model=a,b"], "my_experiment", None)
    assert sweep_name([], "my_experiment", None).startswith("my_experiment-")


def test_a_corrupt_image_read_by_a_loader_worker_is_one_line_naming_the_file(tmp_path):
    """Before `verify` was run: the worker's error reaches error.json as itself, not torch's wrapper."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
    bad = tmp_path / "data" / "a" / "broken.png"
    bad.write_bytes(b"not an image")
    run = tmp_path / "run"
    proc = launcher("dataset=imagefolder", f"dataset.root={tmp_path / 'data'}", "dataset.image_size=32",
                    "dataset.in_memory=no", "dataset.num_workers=1", "model=test_resnet", "proxy=none",
                    "proxy.schedule=1", "explain.enabled=false", f"hydra.run.dir={run}", cwd=tmp_path,
                    module="proxyattention.train")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    error = json.loads((run / "error.json").read_text())
    assert "\n" not in error["error"] and str(bad) in error["error"] and "verify" in error["error"]
    assert "Caught" not in error["error"] and "DataLoader worker" in error["traceback"]


def test_a_report_that_cannot_be_written_is_one_line(fake, run_module, tmp_path):
    assert fake("proxy.threshold=0.1").returncode == 0
    (tmp_path / "a_file").write_text("")
    proc = run_module("proxyattention.report", str(fake.sweep), f"report.out={tmp_path / 'a_file' / 'r'}",
                      cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "cannot write the report" in proc.stderr and "report.out=DIR" in proc.stderr
