"""The launcher from a Hydra app that is not this project's: Hydra's own launcher test suites, and
skip-done and resume of a foreign app's sweep (tests/apps/counter_app.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.test_utils.launcher_common_tests import (
    BatchedSweeperTestSuite,
    IntegrationTestSuite,
    LauncherTestSuite,
)

from launcher import taskcell

APP = Path(__file__).resolve().parent / "apps" / "counter_app.py"


@pytest.fixture(autouse=True)
def own_store(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test its own cell store (``$PROXYATTENTION_STORE``), so no test skips another's jobs."""
    store = tmp_path_factory.mktemp("store")
    monkeypatch.setenv("PROXYATTENTION_STORE", str(store))
    return store


@pytest.fixture(autouse=True)
def fresh_version_base():
    """Hydra's suites expect what a fresh process has: no version base set (the 1.1 defaults, such as
    ``hydra.job.chdir=true``). An earlier test in this process may have composed with version_base 1.3,
    and jobs inherit their launcher's Hydra state."""
    from hydra import version

    base = version.VersionBase.instance()
    saved = base.version_base
    base.version_base = version._UNSPECIFIED_
    yield
    base.version_base = saved


def test_discovery() -> None:
    names = [c.__name__ for c in Plugins.instance().discover(Launcher)]
    assert "LocalLauncher" in names and "SlurmLauncher" in names


@pytest.mark.parametrize("launcher_name, overrides", [("local", ["hydra.launcher.workers=2"])])
class TestLocalLauncher(LauncherTestSuite):
    pass


@pytest.mark.parametrize("launcher_name, overrides", [("local", ["hydra.sweeper.max_batch_size=2"])])
class TestLocalLauncherBatched(BatchedSweeperTestSuite):
    pass


@pytest.mark.parametrize(
    "task_launcher_cfg, extra_flags",
    [({"defaults": [{"override hydra/launcher": "local"}, {"override hydra/hydra_logging": "hydra_debug"},
                    {"override hydra/job_logging": "disabled"}]}, ["-m"])],
)
class TestLocalLauncherIntegration(IntegrationTestSuite):
    pass


# ---------------------------------------------------------------------------------------------------
# Skip-done and resume of a foreign app's sweep


def _sweep(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    counters = tmp_path / "counters"
    counters.mkdir(exist_ok=True)
    full = {**os.environ, "COUNTER_DIR": str(counters), **(env or {})}
    return subprocess.run([sys.executable, str(APP), "-m", "hydra/launcher=local",
                           f"hydra.sweep.dir={tmp_path / 'sweep'}", *args],
                          cwd=tmp_path, env=full, text=True, capture_output=True, timeout=300)


def _runs(tmp_path: Path) -> dict[str, int]:
    return {p.name: len(p.read_text().splitlines()) for p in sorted((tmp_path / "counters").iterdir())}


def _summary(out: str) -> str:
    return out[out.index("cell "):] if "cell " in out else out


def test_reissued_sweep_runs_nothing(tmp_path: Path) -> None:
    first = _sweep(tmp_path, "x=1,2,3")
    assert first.returncode == 0, first.stderr
    assert _runs(tmp_path) == {"x=1": 1, "x=2": 1, "x=3": 1}
    again = _sweep(tmp_path, "x=1,2,3")
    assert again.returncode == 0, again.stderr
    assert _runs(tmp_path) == {"x=1": 1, "x=2": 1, "x=3": 1}  # nothing ran again
    assert "All 3 cells are DONE; nothing to run." in again.stdout
    assert _summary(again.stdout) == _summary(first.stdout)
    # An overlapping sweep into another folder runs only its new job (the store is shared).
    more = _sweep(tmp_path, "x=3,4", "hydra.sweep.dir=other")
    assert more.returncode == 0, more.stderr
    assert _runs(tmp_path) == {"x=1": 1, "x=2": 1, "x=3": 1, "x=4": 1}


def test_summary_and_status_show_each_jobs_return_value(tmp_path: Path) -> None:
    done = _sweep(tmp_path, "x=1,3", "scale=2.5")
    assert done.returncode == 0, done.stderr
    status = subprocess.run([sys.executable, "-m", "launcher.status", str(tmp_path / "sweep")],
                            text=True, capture_output=True, timeout=120)
    for out in (_summary(done.stdout), status.stdout):
        header = next(line for line in out.splitlines() if line.startswith("cell "))
        assert "return" in header.split() and "test/acc" not in header, out
        rows = {line.split()[1] if "overrides" in header.split()[:2] else line.split()[-1]: line.split()
                for line in out.splitlines() if line[:12].isalnum() and " DONE " in line}
        assert rows["x=1"][header.split().index("return")] == "2.5", out
        assert rows["x=3"][header.split().index("return")] == "7.5", out


def test_interrupted_sweep_resumes_only_unfinished_jobs(tmp_path: Path) -> None:
    stopped = _sweep(tmp_path, "x=1,2,3,4", env={"STOP_AT": "3"})
    assert stopped.returncode != 0
    assert _runs(tmp_path) == {"x=1": 1, "x=2": 1, "x=3": 1}
    resumed = _sweep(tmp_path, "x=1,2,3,4")
    assert resumed.returncode == 0, resumed.stderr
    assert _runs(tmp_path) == {"x=1": 1, "x=2": 1, "x=3": 2, "x=4": 1}
    assert "2 of 4 cells to run (2 skipped)" in resumed.stdout


def test_failed_job_is_failed_and_rerun(tmp_path: Path) -> None:
    failed = _sweep(tmp_path, "x=1,2", env={"FAIL_AT": "2"})
    assert failed.returncode != 0
    assert "ValueError: x=2 is refused" in failed.stdout  # the summary shows the error in one line
    fixed = _sweep(tmp_path, "x=1,2")
    assert fixed.returncode == 0, fixed.stderr
    assert _runs(tmp_path) == {"x=1": 1, "x=2": 2}
    forced = _sweep(tmp_path, "x=1,2", "hydra.launcher.rerun=all")  # earlier results moved aside
    assert forced.returncode == 0, forced.stderr
    assert _runs(tmp_path) == {"x=1": 2, "x=2": 3}


def test_return_values_and_job_numbers(tmp_path: Path) -> None:
    """Each job's stored JobReturn (return value, its absolute output folder) and ``hydra.job.num``
    continuing across batches of two."""
    result = _sweep(tmp_path, "x=1,2,3", "hydra.sweeper.max_batch_size=2")
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "sweep"
    for num in range(3):
        hydra_yaml = (sweep / str(num) / ".hydra" / "hydra.yaml").read_text()
        assert f"num: {num}" in hydra_yaml
    cells = sorted((sweep / "cells").iterdir())
    assert len(cells) == 3
    values = sorted(taskcell._read_pickle(c / taskcell.JOB_RETURN).return_value for c in cells)
    assert values == [2.0, 4.0, 6.0]
    out_dirs = {taskcell._read_pickle(c / taskcell.JOB_RETURN).hydra_cfg.hydra.runtime.output_dir for c in cells}
    assert out_dirs == {str(sweep / str(n)) for n in range(3)}


def test_cell_id_is_the_task_config() -> None:
    def task(cfg: object) -> None:
        return None

    assert taskcell.cell_id(task, {"a": 1, "b": {"c": 2}}) == taskcell.cell_id(task, {"b": {"c": 2}, "a": 1})
    assert taskcell.cell_id(task, {"a": 1}) != taskcell.cell_id(task, {"a": 2})


def test_done_jobs_hand_back_stored_returns(hydra_sweep_runner, hydra_restore_singletons, tmp_path: Path) -> None:
    """In process: a re-issued sweep runs no job again and hands back each job's stored return value."""
    calls = tmp_path / "calls"

    def task(cfg: object) -> int:
        with open(calls, "a") as f:
            f.write("ran\n")
        return int(cfg.bar) + 1  # type: ignore[attr-defined]

    def sweep() -> list:
        with hydra_sweep_runner(calling_file=None, calling_module="hydra.test_utils.a_module",
                                task_function=task, config_path="configs", config_name="compose.yaml",
                                overrides=["hydra/launcher=local", "bar=100,200"], temp_dir=tmp_path / "sweep") as s:
            return [(r.overrides, r.return_value, r.status.name) for r in s.returns[0]]

    first = sweep()
    assert first == [(["bar=100"], 101, "COMPLETED"), (["bar=200"], 201, "COMPLETED")]
    assert sweep() == first  # the runner removed the sweep folder: the store still holds the cells
    assert calls.read_text().count("ran") == 2


@pytest.mark.parametrize("option", ["local", "slurm", "slurm_v100"])
def test_launcher_options_found_from_any_app(option: str, hydra_restore_singletons) -> None:
    """``hydra/launcher=<option>`` composes in an app without this project's config folder, with the
    defaults of conf/hydra/launcher/<option>.yaml."""
    from hydra import compose, initialize
    from omegaconf import OmegaConf

    from proxyattention import paths

    with initialize(version_base="1.3", config_path=None):
        cfg = compose(overrides=[f"hydra/launcher={option}"], return_hydra_config=True)
    got = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    folder = paths.conf_dir() / "hydra" / "launcher"
    want: dict = {}
    for name in (["slurm"] if option == "slurm_v100" else []) + [option]:
        want.update({k: v for k, v in OmegaConf.to_container(OmegaConf.load(folder / f"{name}.yaml")).items()
                     if k != "defaults"})
    assert {k: got[k] for k in want} == want


def test_slurm_backend_refuses_other_apps(tmp_path: Path) -> None:
    proc = _sweep(tmp_path, "x=1", "hydra/launcher=slurm")
    assert proc.returncode != 0
    assert "run another app's jobs with hydra/launcher=local" in proc.stderr
    assert not (tmp_path / "counters").exists() or not any((tmp_path / "counters").iterdir())
