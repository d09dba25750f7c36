"""The launcher from a Hydra app that is not this project's: Hydra's own launcher test suites, and
skip-done and resume of a foreign app's sweep (tests/apps/counter_app.py)."""

from __future__ import annotations

import contextlib
import os
import signal
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

from launcher import cellstate, taskcell

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


# ---------------------------------------------------------------------------------------------------
# Slurm: another app's jobs as cells submitted by the Slurm backend (launcher.slurm), without a cluster

from launcher import slurm, slurm_state  # noqa: E402
from launcher.cellstate import CellState  # noqa: E402


class FakeSlurm:
    """Slurm as the submitter and a waiting launch see it, in this process: submitit's executor (each
    batch one array, ids ``100_0``…), ``squeue``/``sacct`` (:func:`launcher.slurm_state.job_states`), and
    a stand-in ``sbatch`` on PATH. Submitted jobs stay PENDING until :meth:`start` runs them here (their
    real :class:`launcher.slurm_job.CellJob`: the cell process ``python -m launcher.taskcell CELL_DIR``);
    with ``start_on_look`` they start at each look at the queue after the first one that follows a
    submission (a waiting launch sees them queued first), and with ``interrupt_on_look`` such a look is
    a Ctrl-C."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, first_id: int = 100) -> None:
        self.params: dict = {}
        self.arrays: list[dict] = []
        self.tasks: dict[str, object] = {}
        self.states: dict[str, str] = {}
        self.next_id = first_id
        self.start_on_look = False
        self.interrupt_on_look = False
        self.looks_after_submit = 0
        bin_dir = tmp_path / "fake-slurm-bin"
        bin_dir.mkdir(exist_ok=True)
        sbatch = bin_dir / "sbatch"
        sbatch.write_text("#!/bin/sh\necho 'the stand-in sbatch runs nothing' >&2\nexit 1\n")
        sbatch.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
        monkeypatch.setattr(slurm.SlurmSubmitter, "_executor", lambda submitter: self)
        monkeypatch.setattr(slurm_state, "job_states", self.job_states)
        monkeypatch.setattr(slurm, "job_states", self.job_states)
        monkeypatch.setattr(slurm, "live_arrays", lambda ids: {a for a in ids if any(
            j.split("_")[0] == a and s in slurm_state.LIVE for j, s in self.states.items())})
        real_refresh = slurm.refresh_status

        def refresh(sweep_dir: Path, statuses: dict, store: object = None) -> dict:
            if self.tasks:
                self.looks_after_submit += 1
                if self.interrupt_on_look:
                    raise KeyboardInterrupt
                if self.start_on_look and self.looks_after_submit > 1:
                    self.start()
            return real_refresh(sweep_dir, statuses, store)

        monkeypatch.setattr(slurm, "refresh_status", refresh)

    # submitit's SlurmExecutor, as the submitter uses it
    def update_parameters(self, **kw: object) -> None:
        self.params.update(kw)

    @contextlib.contextmanager
    def batch(self):
        self._batch: list = []
        yield
        array = str(self.next_id)
        self.next_id += 1
        self.arrays.append({"id": array, "tasks": [t for t, _ in self._batch], "job_name": self.params["job_name"]})
        for n, (task, job) in enumerate(self._batch):
            job.job_id = f"{array}_{n}"
            self.tasks[job.job_id] = task
            self.states[job.job_id] = "PENDING"
        self.looks_after_submit = 0

    def submit(self, task: object) -> object:
        job = type("FakeJob", (), {})()
        job.job_id = "?"
        job.paths = type("Paths", (), {"stdout": Path("/nonexistent/%t.out"), "stderr": Path("/nonexistent/%t.err")})()
        self._batch.append((task, job))
        return job

    # squeue/sacct
    def job_states(self, job_ids) -> dict[str, str]:
        return {j: self.states[j] for j in job_ids if j in self.states}

    def start(self, *job_ids: str) -> None:
        """Run the PENDING jobs (or those named) to their end, as their array tasks would on a node."""
        import signal

        from launcher import manifest

        for jid in job_ids or [j for j, s in self.states.items() if s == "PENDING"]:
            if manifest.claim_holder(Path(self.tasks[jid].cell_dir)) is not None:  # type: ignore[attr-defined]
                continue  # the submitter still holds the cell: the job would wait for it
            array, task_no = jid.split("_")
            env = {"SLURM_JOB_ID": array, "SLURM_ARRAY_JOB_ID": array, "SLURM_ARRAY_TASK_ID": task_no}
            saved_env = {k: os.environ.get(k) for k in env}
            saved_usr2 = signal.getsignal(signal.SIGUSR2)
            os.environ.update(env)
            self.states[jid] = "RUNNING"
            try:
                self.tasks[jid]()  # type: ignore[operator]
                self.states[jid] = "COMPLETED"
            except Exception:  # noqa: BLE001 (a cell that did not end DONE: its job ends FAILED)
                self.states[jid] = "FAILED"
            finally:
                signal.signal(signal.SIGUSR2, saved_usr2)
                for k, v in saved_env.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v


@pytest.fixture
def fake_slurm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeSlurm:
    return FakeSlurm(monkeypatch, tmp_path)


@pytest.fixture
def said(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the launches' consoles print, from this moment (and still printed)."""
    from launcher.console import Console

    lines: list[str] = []
    real = Console.say

    def say(self: Console, text: str) -> None:
        lines.append(text)
        real(self, text)

    monkeypatch.setattr(Console, "say", say)
    return lines


SLURM = ["hydra/launcher=slurm", "hydra.launcher.max_array_size=10", "hydra.launcher.poll_s=0.01",
         "hydra.launcher.heartbeat_s=0.5"]


def counting_task(calls: Path):
    """A task function that notes each run in ``calls`` and returns ``bar + 1``."""
    def task(cfg: object) -> int:
        with open(calls, "a") as f:
            f.write(f"{cfg.bar}\n")  # type: ignore[attr-defined]
        return int(cfg.bar) + 1  # type: ignore[attr-defined]

    return task


def sweep_returns(runner, task, sweep: Path, *overrides: str) -> list:
    with runner(calling_file=None, calling_module="hydra.test_utils.a_module", task_function=task,
                config_path="configs", config_name="compose.yaml", overrides=[*SLURM, *overrides],
                temp_dir=sweep) as s:
        return list(s.returns[0])


def test_slurm_submits_another_apps_jobs_and_returns_at_once(hydra_sweep_runner, hydra_restore_singletons,
                                                             fake_slurm: FakeSlurm, tmp_path: Path,
                                                             own_store: Path) -> None:
    from launcher.slurm_job import CellJob

    calls = tmp_path / "calls"
    rets = sweep_returns(hydra_sweep_runner, counting_task(calls), tmp_path / "sweep", "bar=100,200")
    assert not calls.exists()  # nothing ran in the launcher: the jobs wait in the queue
    (array,) = fake_slurm.arrays
    assert [type(t) for t in array["tasks"]] == [CellJob, CellJob]
    assert {t.cell_module for t in array["tasks"]} == {taskcell.MODULE}  # type: ignore[attr-defined]
    assert array["job_name"] == "a_module"  # the app's job name, not the trials' profile name
    assert not any(t.hub_offline for t in array["tasks"])  # type: ignore[attr-defined]
    assert [(r.overrides, r.status.name, r.job_id) for r in rets] == [
        (["bar=100"], "UNKNOWN", "100_0"), (["bar=200"], "UNKNOWN", "100_1")]
    assert all(isinstance(r, taskcell.QueuedJobReturn) and r.return_value is None for r in rets)
    assert [r.cfg.bar for r in rets] == [100, 200]
    cells = [own_store / Path(r.working_dir).name for r in rets]  # the runner removed the sweep folder
    assert [t.cell_dir for t in array["tasks"]] == [str(c) for c in cells]  # type: ignore[attr-defined]
    for r, cell in zip(rets, cells):
        assert (cell / taskcell.JOB).is_file() and (cell / "slurm.json").is_file()
        s = cellstate.read_status(cell)
        assert (s.state, s.backend, s.job_id) == (CellState.PENDING, "slurm", r.job_id)
    # The jobs run (on the "node"): each writes its return value, as a local cell does.
    fake_slurm.start()
    assert calls.read_text().split() == ["100", "200"]
    assert [taskcell._read_pickle(c / taskcell.JOB_RETURN).return_value for c in cells] == [101, 201]
    assert [cellstate.read_status(c).state for c in cells] == [CellState.DONE, CellState.DONE]


def test_slurm_reissue_skips_done_and_queued_jobs(hydra_sweep_runner, hydra_restore_singletons,
                                                  fake_slurm: FakeSlurm, tmp_path: Path, said: list) -> None:
    calls = tmp_path / "calls"
    task = counting_task(calls)
    sweep_returns(hydra_sweep_runner, task, tmp_path / "sweep", "bar=100,200")
    fake_slurm.start("100_0")  # bar=100 ends DONE; bar=200 stays queued
    said.clear()
    rets = sweep_returns(hydra_sweep_runner, task, tmp_path / "sweep", "bar=100,200,300")
    out = "\n".join(said)
    assert [t.cell_dir.rsplit("/", 1)[1] for t in fake_slurm.arrays[1]["tasks"]] == [  # type: ignore[attr-defined]
        Path(rets[2].working_dir).name]  # only the new job is submitted
    assert len(fake_slurm.arrays) == 2 and "submitted 1 of 3 cells" in out
    assert "already queued as job 100_1; not submitted" in out
    assert (rets[0].status.name, rets[0].return_value) == ("COMPLETED", 101)  # from the store
    assert (rets[1].status.name, rets[1].job_id) == ("UNKNOWN", "100_1")
    assert (rets[2].status.name, rets[2].job_id) == ("UNKNOWN", "101_0")
    assert calls.read_text().split() == ["100"]
    # Once every job ended, a re-issue submits nothing and hands back every value.
    fake_slurm.start()
    again = sweep_returns(hydra_sweep_runner, task, tmp_path / "sweep", "bar=100,200,300")
    assert [(r.status.name, r.return_value) for r in again] == [("COMPLETED", 101), ("COMPLETED", 201),
                                                               ("COMPLETED", 301)]
    assert len(fake_slurm.arrays) == 2 and "All 3 cells are DONE; nothing to submit" in said[-1]
    assert sorted(calls.read_text().split()) == ["100", "200", "300"]


def test_slurm_wait_returns_each_jobs_value_and_the_summary(hydra_sweep_runner, hydra_restore_singletons,
                                                            fake_slurm: FakeSlurm, tmp_path: Path, said: list) -> None:
    calls = tmp_path / "calls"
    fake_slurm.start_on_look = True
    rets = sweep_returns(hydra_sweep_runner, counting_task(calls), tmp_path / "sweep", "bar=100,200",
                         "hydra.launcher.wait=true")
    assert [(r.overrides, r.status.name, r.return_value) for r in rets] == [
        (["bar=100"], "COMPLETED", 101), (["bar=200"], "COMPLETED", 201)]
    assert not any(isinstance(r, taskcell.QueuedJobReturn) for r in rets)
    assert all(r.hydra_cfg.hydra.runtime.output_dir == r.working_dir for r in rets)  # the job's own folder
    out = "\n".join(said)
    assert "waiting for 2 cells queued or running in Slurm" in out, out
    assert "2 cells: 2 DONE" in out, out  # the summary, once the jobs ended
    header = next(line for line in out.splitlines() if line.startswith("cell "))
    assert "return" in header.split()
    assert fake_slurm.states == {"100_0": "COMPLETED", "100_1": "COMPLETED"}


def test_slurm_wait_hands_back_a_failed_jobs_exception(hydra_sweep_runner, hydra_restore_singletons,
                                                       fake_slurm: FakeSlurm, tmp_path: Path) -> None:
    def task(cfg: object) -> int:
        if int(cfg.bar) == 200:  # type: ignore[attr-defined]
            raise ValueError("bar=200 is refused")
        return 1

    fake_slurm.start_on_look = True
    with pytest.raises(ValueError, match="bar=200 is refused"):  # Hydra's BasicSweeper raises it
        sweep_returns(hydra_sweep_runner, task, tmp_path / "sweep", "bar=100,200", "hydra.launcher.wait=true")
    assert fake_slurm.states == {"100_0": "COMPLETED", "100_1": "FAILED"}


def test_slurm_wait_interrupted_leaves_the_jobs_queued(hydra_sweep_runner, hydra_restore_singletons,
                                                       fake_slurm: FakeSlurm, tmp_path: Path, capfd) -> None:
    fake_slurm.interrupt_on_look = True
    with pytest.raises(SystemExit) as stopped:
        sweep_returns(hydra_sweep_runner, counting_task(tmp_path / "calls"), tmp_path / "sweep", "bar=100",
                      "hydra.launcher.wait=true")
    assert stopped.value.code == 130
    out = capfd.readouterr().out
    assert "stopped waiting; the submitted jobs keep running in Slurm" in out, out
    assert fake_slurm.states == {"100_0": "PENDING"}  # nothing cancelled
    (cell,) = (p for p in (tmp_path / "sweep" / "cells").iterdir())
    assert cellstate.read_status(cell).state == CellState.PENDING


def test_slurm_wait_and_poll_options_are_checked(hydra_sweep_runner, hydra_restore_singletons,
                                                 fake_slurm: FakeSlurm, tmp_path: Path) -> None:
    from hydra.errors import HydraException

    with pytest.raises(HydraException, match="hydra.launcher.poll_s=0.0 must be > 0"):
        sweep_returns(hydra_sweep_runner, counting_task(tmp_path / "calls"), tmp_path / "sweep", "bar=100",
                      "hydra.launcher.wait=true", "hydra.launcher.poll_s=0")
    assert fake_slurm.arrays == []


def test_slurm_wait_for_trials_waits_and_prints_the_summary(tmp_path: Path, fake_slurm: FakeSlurm,
                                                            monkeypatch: pytest.MonkeyPatch, said: list) -> None:
    """This project's trials share the path (launcher.slurm.run): with wait=true it waits for the trial
    cells (here a stand-in cell module), fills the launch's statuses and prints the summary."""
    from launcher.manifest import CellRecord
    from test_slurm import sleep_cell

    module, env = sleep_cell(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    sweep = tmp_path / "sweep"
    records = [CellRecord(id=f"c{i:02d}", overrides=[f"train.seed={i}"]) for i in range(2)]
    for r in records:
        cellstate.cell_dir(sweep, r.id).mkdir(parents=True)
    cfg = {"cell_module": module.split("=", 1)[1], "max_array_size": 10, "heartbeat_s": 0.5, "store": None}
    collected: dict = {}
    assert slurm.run(sweep, records, cfg, collect=collected) == 0  # submit and exit
    assert collected == {} and set(fake_slurm.states.values()) == {"PENDING"}
    fake_slurm.start()
    fake_slurm.start_on_look = True
    more = [CellRecord(id="c02", overrides=["train.seed=2"])]
    cellstate.cell_dir(sweep, "c02").mkdir(parents=True)
    said.clear()
    code = slurm.run(sweep, records + more, {**cfg, "wait": True, "poll_s": 0.01}, collect=collected)
    out = "\n".join(said)
    assert code == 0, out
    assert "submitted 1 of 3 cells" in out and "waiting for 1 cell queued or running in Slurm" in out
    assert {cid: s.state for cid, s in collected.items()} == {c: CellState.DONE for c in ("c00", "c01", "c02")}
    assert "3 cells: 3 DONE" in out, out
    # A failed cell: exit code 1, as the local backend's.
    monkeypatch.setenv("SLEEP_CELL_S", "not-a-number")  # the stand-in cell raises
    worse = [CellRecord(id="c03", overrides=["train.seed=3"])]
    cellstate.cell_dir(sweep, "c03").mkdir(parents=True)
    assert slurm.run(sweep, worse, {**cfg, "wait": True, "poll_s": 0.01}) == 1
    assert cellstate.read_status(cellstate.cell_dir(sweep, "c03")).state == CellState.FAILED


def test_slurm_wait_is_refused_for_an_optuna_study(tmp_path: Path) -> None:
    pytest.importorskip("optuna", minversion="4.0", reason="needs pip install -e '.[optuna]' (in [test])")
    proc = subprocess.run([sys.executable, "-m", "launcher", "+sweep=optuna_proxy", "model=test_resnet",
                           "hydra/launcher=slurm", "hydra.launcher.wait=true", "hydra.launcher.dry_run=true",
                           f"hydra.sweep.dir={tmp_path / 's'}"], cwd=tmp_path, text=True, capture_output=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "hydra.launcher.wait=true does not apply to an Optuna study on Slurm" in proc.stderr, proc.stderr
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------------------------------
# Slurm: against the single-node cluster (`bash .ci/slurm.sh up`; skipped with the reason without one,
# a failure with PROXYATTENTION_REQUIRE_SLURM=1), each job a tiny task on one CPU


@pytest.fixture(scope="module")
def slurm_problem() -> str | None:
    """Why no usable Slurm cluster is here (None: one answers), asked once per module (without a
    controller ``sinfo`` retries for seconds)."""
    from test_slurm import cluster_problem

    return cluster_problem()


@pytest.fixture
def slurm_cluster(slurm_problem: str | None, own_store: Path):
    """A Slurm cluster that answers; the jobs of the test's cells are cancelled when it ends."""
    import json

    from test_slurm import REQUIRE_ENV

    problem = slurm_problem
    if problem is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but no Slurm cluster: {problem}. `bash .ci/slurm.sh up` starts one (root).")
        pytest.skip(f"no Slurm cluster: {problem} (`sudo bash .ci/slurm.sh up` starts a single-node one)")
    yield
    ids = []
    for rec in own_store.glob("*/slurm.json"):
        d = json.loads(rec.read_text())
        ids += [d["job_id"], *d.get("previous_jobs", [])]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)


# As hydra_submitit_launcher runs Hydra's suites on its Slurm launcher: every sweep waits for its jobs.
ON_SLURM = ["hydra.launcher.wait=true", "hydra.launcher.poll_s=0.5", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=5", "hydra.launcher.heartbeat_s=2"]


@pytest.mark.slurm
@pytest.mark.parametrize("launcher_name, overrides", [("slurm", ON_SLURM)])
class TestSlurmLauncher(LauncherTestSuite):
    @pytest.fixture(autouse=True)
    def _on_the_cluster(self, slurm_cluster) -> None:
        pass


@pytest.mark.slurm
@pytest.mark.parametrize("launcher_name, overrides", [("slurm", [*ON_SLURM, "hydra.sweeper.max_batch_size=2"])])
class TestSlurmLauncherBatched(BatchedSweeperTestSuite):
    @pytest.fixture(autouse=True)
    def _on_the_cluster(self, slurm_cluster) -> None:
        pass


SLURM_ARGS = ("hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.heartbeat_s=2",
              "hydra.launcher.poll_s=0.5")


def _table(out: str) -> str:
    """The summary table of a launch's output, from its header line on."""
    return out[out.index("\ncell ") + 1:]


def _cells_of(sweep: Path) -> dict:
    import json

    out = subprocess.run([sys.executable, "-m", "launcher.status", str(sweep), "--json"], text=True,
                         capture_output=True, check=True, timeout=120).stdout
    return {c["overrides"][0]: c for c in json.loads(out)["cells"]}


@pytest.mark.slurm
def test_slurm_counter_app_submits_and_exits_then_a_reissue_waits(slurm_cluster, tmp_path: Path) -> None:
    from waiting import wait_for

    first = _sweep(tmp_path, "x=1,2", *SLURM_ARGS)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "submitted 2 of 2 cells to Slurm" in first.stdout and "waiting for" not in first.stdout
    sweep = tmp_path / "sweep"
    cells = wait_for(lambda: (c := _cells_of(sweep)) and all(v["state"] == "DONE" for v in c.values()) and c,
                     120, "the 2 jobs to end", step=1.0)
    assert {k: v["metrics"]["return_value"] for k, v in cells.items()} == {"x=1": 2.0, "x=2": 4.0}
    # A re-issue with wait=true submits only the new job, waits for it, prints the summary.
    again = _sweep(tmp_path, "x=1,2,3", *SLURM_ARGS, "hydra.launcher.wait=true")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "submitted 1 of 3 cells to Slurm" in again.stdout and "waiting for 1 cell " in again.stdout
    assert "3 cells: 3 DONE" in again.stdout, again.stdout
    rows = {line.split()[1]: line.split() for line in _table(again.stdout).splitlines() if " DONE " in line}
    assert [rows[x][3] for x in ("x=1", "x=2", "x=3")] == ["2", "4", "6"], again.stdout
    assert _runs(tmp_path) == {"x=1": 1, "x=2": 1, "x=3": 1}
    # Everything DONE: nothing submitted, nothing waited for, the same summary.
    third = _sweep(tmp_path, "x=1,2,3", *SLURM_ARGS, "hydra.launcher.wait=true")
    assert third.returncode == 0 and "All 3 cells are DONE; nothing to submit" in third.stdout, third.stdout
    assert _table(third.stdout) == _table(again.stdout)
    # A job that raises: the waiting command fails with the job's error, as with hydra/launcher=local.
    failed = _sweep(tmp_path, "x=4", *SLURM_ARGS, "hydra.launcher.wait=true", env={"FAIL_AT": "4"})
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "ValueError: x=4 is refused" in failed.stdout and "1 cells: 1 FAILED" in failed.stdout


SLEEPY_APP = '''
import time

import hydra


@hydra.main(version_base="1.3", config_path=None, config_name="sleepy")
def app(cfg):
    time.sleep(cfg.seconds)
    return cfg.seconds


if __name__ == "__main__":
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="sleepy", node={"seconds": 0.0})
    app()
'''


@pytest.mark.slurm
def test_slurm_wait_interrupted_leaves_the_job_running_and_a_reissue_waits_for_it(slurm_cluster,
                                                                                   tmp_path: Path) -> None:
    from fakecell import default_signals

    app = tmp_path / "sleepy_app.py"
    app.write_text(SLEEPY_APP)
    sweep = tmp_path / "sweep"
    args = [sys.executable, str(app), "-m", *SLURM_ARGS, "hydra.launcher.wait=true", f"hydra.sweep.dir={sweep}",
            "seconds=6"]
    proc = subprocess.Popen(args, cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=default_signals)
    out = []
    assert proc.stdout is not None
    for line in proc.stdout:  # until the launch waits
        out.append(line)
        if line.startswith("waiting for 1 cell"):
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    text = "".join(out) + rest
    assert proc.returncode == 130, text
    assert "stopped waiting; the submitted jobs keep running in Slurm" in text
    (cell,) = _cells_of(sweep).values()
    assert cell["state"] in ("PENDING", "RUNNING"), cell  # not cancelled
    job = cell["job_id"]
    again = subprocess.run(args, cwd=tmp_path, text=True, capture_output=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"already queued as job {job}; not submitted" in again.stdout or "(RUNNING; not submitted)" in \
        again.stdout or "held by job" in again.stdout, again.stdout
    assert "submitted 0 of 1 cells" in again.stdout and "waiting for 1 cell " in again.stdout, again.stdout
    assert "1 cells: 1 DONE" in again.stdout, again.stdout
    assert _cells_of(sweep)["seconds=6"]["job_id"] == job  # the same job, never a second copy
