"""The package outside its clone: a wheel carries conf/ and sweeps/, its console commands work from any
folder; and users add their own configs with ``--config-dir DIR`` or ``hydra.searchpath=[file://DIR]``.

The wheel tests (slow) build the wheel from a copy of the source (a build leaves ``build/`` behind) and
install it without its dependencies into a fresh virtual environment. That environment sees this one's
packages through a folder of links that leaves out the project itself and its editable finder, so torch
is not installed again and nothing is imported from the clone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("proxyattention", "launcher", "hydra_plugins")
DATA = {"conf": "proxyattention/_conf", "sweeps": "proxyattention/_sweeps"}  # repository → wheel
# Each console command and a line of its --help (the Hydra apps list the config groups they found).
SCRIPTS = {"pa-sweep": "dataset: asl_alphabet, caltech101", "pa-train": "dataset: asl_alphabet, caltech101",
           "pa-status": "sweep_dir", "pa-report": "SWEEP_DIR", "pa-data": "{prepare,verify,weights}"}


# -------------------------------------------------------------- your own configs (editable install)

@pytest.fixture
def own_configs(tmp_path: Path) -> Path:
    """A user's config folder: an ImageFolder dataset ``mine`` and a saved sweep ``mine`` over it."""
    root = tmp_path / "my_configs"
    (root / "dataset").mkdir(parents=True)
    (root / "sweep").mkdir()
    images = tmp_path / "my_images"
    from PIL import Image

    for k, cls in enumerate(("cats", "dogs")):
        (images / cls).mkdir(parents=True)
        for i in range(2):  # planning checks that each class has images
            Image.new("RGB", (8, 8), (100 * k + i, 0, 0)).save(images / cls / f"{i}.png")
    (root / "dataset" / "mine.yaml").write_text(
        f"defaults:\n  - imagefolder\n  - _self_\nname: mine\nroot: {images}\nimage_size: 48\n")
    (root / "sweep" / "mine.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n      dataset: mine\n"
        "      model: test_resnet\n      proxy.threshold: 0.1,0.4\n")
    return root


def _config_dir_args(way: str, root: Path) -> list[str]:
    return ["--config-dir", str(root)] if way == "config-dir" else [f"hydra.searchpath=[file://{root}]"]


@pytest.mark.parametrize("way", ["config-dir", "searchpath"])
def test_an_own_dataset_config_composes(way, own_configs, run_module, tmp_path):
    r = run_module("launcher", *_config_dir_args(way, own_configs), "dataset=mine", "--cfg", "job",
                   cwd=tmp_path, check=True)
    assert "name: mine\n  source: imagefolder\n" in r.stdout
    assert f"root: {tmp_path / 'my_images'}\n  image_size: 48\n" in r.stdout


@pytest.mark.parametrize("way", ["config-dir", "searchpath"])
def test_an_own_saved_sweep_plans_its_cells(way, own_configs, run_module, tmp_path):
    r = run_module("launcher", *_config_dir_args(way, own_configs), "+sweep=mine",
                   "hydra.launcher.dry_run=true", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
                   check=True)
    assert "proxy.threshold=0.1" in r.stdout and "proxy.threshold=0.4" in r.stdout
    assert "dry run: 3 of 3 cells would run" in r.stdout  # two thresholds and their shared baseline


# ------------------------------------------------------------------------------ the installed wheel

@dataclass
class Installed:
    wheel: Path
    bin: Path  # the fresh environment's scripts
    site: Path  # its site-packages
    env: dict  # os.environ without anything that would reach the clone


def _copy_source(dest: Path) -> Path:
    """What the build reads: the packages, conf/, sweeps/, pyproject.toml and README.md."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in (*PACKAGES, *DATA):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    return dest


def _dependency_view(dest: Path) -> Path:
    """Links to every entry of this environment's site-packages but the project's own."""
    dest.mkdir()
    for site in dict.fromkeys((sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])):
        for entry in Path(site).iterdir():
            if entry.name.startswith(("__editable__", "proxyattention")) or (dest / entry.name).exists():
                continue
            (dest / entry.name).symlink_to(entry)
    return dest


def _run(cmd: list, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    base = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    src = _copy_source(base / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", base / "dist", src], cwd=base, env=env)
    (wheel,) = (base / "dist").glob("proxyattention-*.whl")

    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=base, env=env)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=base, env=env).stdout.strip())
    (site / "dependencies.pth").write_text(f"{_dependency_view(base / 'deps')}\n")
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=base, env=env)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return Installed(wheel, venv / "bin", site, env)


@pytest.mark.slow
def test_the_wheel_carries_every_module_and_config(installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    assert not modules - names, "add the missing packages to [tool.setuptools] packages in pyproject.toml"
    configs = {f"{DATA[d]}/{p.relative_to(REPO / d).as_posix()}" for d in DATA for p in (REPO / d).rglob("*.yaml")}
    assert configs and not configs - names
    entry_points = zipfile.ZipFile(installed.wheel).read("proxyattention-0.1.0.dist-info/entry_points.txt")
    assert all(f"{s} = ".encode() in entry_points for s in SCRIPTS)


@pytest.mark.slow
def test_the_installed_package_finds_its_configs_in_site_packages(installed, tmp_path):
    code = ("import launcher, proxyattention.paths as p; "
            "print(launcher.__file__); print(p.conf_dir()); print(p.sweeps_dir())")
    lines = _run([installed.bin / "python", "-c", code], cwd=tmp_path, env=installed.env).stdout.split()
    site = installed.site.resolve()
    assert [Path(x).resolve() for x in lines] == [site / "launcher" / "__init__.py", site / DATA["conf"],
                                                 site / DATA["sweeps"]]
    for script, text in SCRIPTS.items():
        assert text in _run([installed.bin / script, "--help"], cwd=tmp_path, env=installed.env).stdout, script


@pytest.mark.slow
def test_the_installed_sweep_command_plans_grids_and_saved_sweeps(installed, tmp_path):
    env = {**installed.env, "PROXYATTENTION_STORE": str(tmp_path / "store")}
    work = tmp_path / "empty"
    work.mkdir()
    grid = _run([installed.bin / "pa-sweep", "model=test_resnet", "proxy.threshold=0.1,0.4",
                 "hydra.launcher.dry_run=true", f"hydra.sweep.dir={tmp_path / 'grid'}"], cwd=work, env=env)
    assert "proxy.threshold=0.1" in grid.stdout and "proxy.threshold=0.4" in grid.stdout
    assert "dry run: 3 of 3 cells would run" in grid.stdout
    saved = _run([installed.bin / "pa-sweep", "+sweep=smoke", "hydra.launcher.dry_run=true",
                  f"hydra.sweep.dir={tmp_path / 'smoke'}"], cwd=work, env=env)
    assert "proxy.schedule='1,p,1' proxy.threshold=0.4" in saved.stdout
    assert "dry run: 3 of 3 cells would run" in saved.stdout
    completion = _run([installed.bin / "pa-sweep", "--shell-completion", "install=bash"], cwd=work, env=env)
    assert completion.stdout.rstrip().endswith("-F hydra_bash_completion pa-sweep")
    assert list(work.iterdir()) == []  # nothing written where the command ran


@pytest.mark.slow
def test_the_installed_trial_command_runs_one_epoch(installed, tmp_path):
    env = {**installed.env, "PROXYATTENTION_CACHE": str(tmp_path / "cache")}
    work, out = tmp_path / "empty", tmp_path / "trial"
    work.mkdir()
    # One epoch on a tenth of the digits (3 steps), no proxy step and no explainability pass.
    _run([installed.bin / "pa-train", "dataset=digits", "model=test_resnet", "proxy=none", "proxy.schedule=1",
          "dataset.val_fraction=0.4", "dataset.test_fraction=0.5", "explain.enabled=false",
          "train.progress=false", f"hydra.run.dir={out}"], cwd=work, env=env)
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "done" and result["run"]["epochs"] == 1
