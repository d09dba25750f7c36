"""An Optuna study on Slurm (launcher.optuna_worker): the submitter sends N worker jobs (an array under
the cap) that loop ask → run a cell → tell on the shared journal, and exits. Without a cluster: the
number of workers, the cap, no duplicates on a re-issue, nothing for a complete study, a dry run that
writes nothing; the worker loop against a temp journal (two workers at once never overshoot n_trials, an
abandoned RUNNING trial is taken over as the same trial, a FAIL cell is a FAIL trial, a prune request a
PRUNED one). On the real single-node Slurm (skipped with the reason when none answers; a failure with
``PROXYATTENTION_REQUIRE_SLURM=1``): a 2-trial study of test_resnet with 2 workers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import pytest

optuna = pytest.importorskip("optuna", minversion="4.0", reason="needs pip install -e '.[optuna]' (in [test])")

from hydra.core.utils import JobReturn, JobStatus  # noqa: E402
from proxyattention.sweep.plan import Plan, PlannedCell  # noqa: E402

from launcher import (
    cellstate,  # noqa: E402
    plugin,  # noqa: E402
)
from proxyattention.sweep import launch as trial_launch  # noqa: E402
from launcher import optuna_sweeper as osw  # noqa: E402
from launcher import optuna_worker as ow  # noqa: E402
from launcher.manifest import CellRecord  # noqa: E402
from launcher.slurm import SlurmOptions  # noqa: E402

SAVED = ["+sweep=optuna_proxy"]
TRIAL = ("dataset=digits", "model=test_resnet", "explain.enabled=false", "dataset.image_size=16")


# ------------------------------------------------------------------------------------------ submitting

class FakeJob:
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id


class FakeExecutor:
    """submitit's SlurmExecutor as the worker submission uses it: one batch is one array."""

    def __init__(self, first_id: int = 500) -> None:
        self.params: dict = {}
        self.next_id = first_id
        self.arrays: list[dict] = []

    def update_parameters(self, **kw) -> None:
        self.params.update(kw)

    @contextlib.contextmanager
    def batch(self):
        self._jobs: list[tuple[object, FakeJob]] = []
        yield
        array = str(self.next_id)
        self.next_id += 1
        self.arrays.append({"id": array, "tasks": [t for t, _ in self._jobs], **self.params})
        for n, (_, job) in enumerate(self._jobs):
            job.job_id = f"{array}_{n}"

    def submit(self, task) -> FakeJob:
        job = FakeJob("?")
        self._jobs.append((task, job))
        return job


def submit(tmp_path, monkeypatch, fake, live=(), n_workers=3, finished=0, n_trials=10, **opts):
    monkeypatch.setattr(ow, "live_workers", lambda sweep_dir: list(live))
    said: list[str] = []
    ids = ow.submit_workers(tmp_path / "sweep", SlurmOptions(**opts), n_workers, ["model=test_resnet"],
                            finished=finished, n_trials=n_trials, say=said.append, executor=fake)
    return ids, "\n".join(said)


def test_n_workers_are_one_array_under_the_cap_with_the_cells_sbatch_options(tmp_path, monkeypatch):
    fake = FakeExecutor()
    ids, _ = submit(tmp_path, monkeypatch, fake, n_workers=3, array_parallelism=2, timeout_min=240,
                    partition="gpu", gres="gpu:1", job_name="proxyattention")
    assert ids == ["500_0", "500_1", "500_2"] and len(fake.arrays) == 1
    a = fake.arrays[0]
    assert a["array_parallelism"] == 2 and a["time"] == 240  # timeout_min: each worker's --time
    assert a["partition"] == "gpu" and a["gres"] == "gpu:1" and a["job_name"] == "proxyattention-worker"
    assert a["additional_parameters"]["requeue"] is True  # at its time limit a worker is requeued
    assert all(isinstance(t, ow.WorkerJob) and t.argv == ["model=test_resnet"] and t.requeue for t in a["tasks"])
    assert ow.read_workers(tmp_path / "sweep") == ids


def test_requeue_off_submits_workers_slurm_never_requeues(tmp_path, monkeypatch):
    fake = FakeExecutor()
    submit(tmp_path, monkeypatch, fake, n_workers=2, requeue=False)
    (a,) = fake.arrays
    assert "requeue" not in a["additional_parameters"] and not any(t.requeue for t in a["tasks"])
    assert all(t.checkpoint() is None for t in a["tasks"])


def test_a_worker_requeued_at_its_time_limit_resubmits_itself_and_takes_its_own_trial_back(tmp_path):
    from submitit.helpers import DelayedSubmission

    job = ow.WorkerJob(argv=["model=test_resnet"], cwd=str(tmp_path), env={"A": "1"}, stop_grace_s=5.0)
    again = job.checkpoint()
    assert isinstance(again, DelayedSubmission) and again.function is not job
    assert again.function.__getstate__() == job.__getstate__()  # the same worker, fresh
    journal = tmp_path / "optuna.journal"
    study = journal_study(journal)
    mine = study.ask()
    mine.suggest_float("x", 0, 1)
    mine.set_user_attr("overrides", ["x=0.3"])
    mine.set_user_attr(ow.WORKER_ATTR, "130_1")  # left RUNNING at the limit; Slurm restarts job 130_1
    ran = []

    def run(trial, overrides):
        ran.append((trial.number, overrides))
        study.tell(trial, 1.0)
        return "COMPLETE"

    ow.WorkerLoop(study=study, n_trials=1, worker_id="130_1", lock=tmp_path / "lock", new_overrides=lambda t: [],
                  run=run, alive=lambda w: True, say=lambda s: None).loop()
    assert ran == [(mine.number, ["x=0.3"])] and study.get_trials()[0].state.name == "COMPLETE"


def test_a_reissue_submits_only_the_workers_not_queued_or_running(tmp_path, monkeypatch):
    fake = FakeExecutor()
    first, _ = submit(tmp_path, monkeypatch, fake, n_workers=3)
    again, said = submit(tmp_path, monkeypatch, fake, live=first[:2], n_workers=3)
    assert len(again) == 1 and ow.read_workers(tmp_path / "sweep") == first + again
    none, said = submit(tmp_path, monkeypatch, fake, live=first[:2] + again, n_workers=3)
    assert none == [] and "none submitted" in said and len(fake.arrays) == 2


def test_a_complete_study_submits_nothing_and_never_more_workers_than_trials_left(tmp_path, monkeypatch):
    fake = FakeExecutor()
    ids, said = submit(tmp_path, monkeypatch, fake, n_workers=4, finished=5, n_trials=5)
    assert ids == [] and fake.arrays == [] and "no worker to submit" in said
    ids, _ = submit(tmp_path, monkeypatch, fake, n_workers=4, finished=3, n_trials=5)
    assert len(ids) == 2


def test_slurm_dry_run_says_what_it_would_submit_and_writes_nothing(tmp_path, run_module):
    sweep = tmp_path / "s"
    proc = run_module("launcher", *SAVED, "model=test_resnet", "hydra/launcher=slurm", "hydra.sweeper.n_trials=6",
                      "hydra.launcher.workers=2", "hydra.launcher.timeout_min=90", "hydra.launcher.dry_run=true",
                      f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "up to 2 worker job(s) would be submitted" in proc.stdout and "0 of its 6 trials" in proc.stdout
    assert "time limit 90 min per worker" in proc.stdout and "hydra/launcher=local" in proc.stdout
    assert not sweep.exists()


def test_worker_argv_runs_the_same_command_on_the_local_backend(tmp_path):
    from hydra import compose, initialize_config_dir

    from proxyattention.config import register_configs

    register_configs()
    plugin.register_configs()
    plugin.register_resolvers()
    import hydra_plugins.proxyattention_launcher  # noqa: F401

    repo = Path(__file__).resolve().parents[1]
    with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=test_resnet", "hydra/launcher=slurm",
                                           "hydra.launcher.cpus_per_task=3", "hydra.launcher.partition=p",
                                           "hydra.launcher.objective_vs_baseline=true"], return_hydra_config=True)
    argv = ow.worker_argv(cfg, tmp_path / "s", SlurmOptions.from_config(cfg.hydra.launcher))
    assert "model=test_resnet" in argv and "hydra/launcher=local" in argv
    assert "hydra.launcher.threads_per_cell=3" in argv and "hydra.launcher.objective_vs_baseline=true" in argv
    assert not any(a.startswith(("hydra/launcher=slurm", "hydra.launcher.partition")) for a in argv)
    assert f"hydra.sweep.dir='{tmp_path / 's'}'" in argv


# ------------------------------------------------------------------------------------------ the worker loop

def journal_study(path: Path, name: str = "s"):
    storage = osw.open_storage("journal", str(path))
    return optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)


@pytest.mark.parametrize("reseed", [True, False])
def test_two_workers_of_a_seeded_study_never_propose_the_same_trials(tmp_path, reseed):
    """Both workers open the study before either asks (the Slurm array starts them at once): with the sampler
    made again before each ask, seeded by the trials the study has, their trials differ; without, the
    seeded sampler of each process replays the same suggestions."""
    journal = tmp_path / "optuna.journal"
    journal_study(journal)

    def sampler(n_trials_so_far: int):
        return optuna.samplers.TPESampler(seed=0 + n_trials_so_far)

    studies = [journal_study(journal) for _ in ("w1", "w2")]
    for s in studies:
        s.sampler = sampler(0)  # each worker's sampler as it opened the study: no trials yet
    params = []
    for wid, study in zip(("w1", "w2", "w1", "w2"), studies * 2):
        loop = ow.WorkerLoop(study=study, n_trials=4, worker_id=wid, lock=Path(str(journal) + ow.LOCK_SUFFIX),
                             new_overrides=lambda t: [f"x={t.suggest_float('x', 0, 1)}"], run=lambda t, o: None,
                             alive=lambda w: True, say=lambda s: None, reseed=sampler if reseed else None)
        trial, overrides, resumed = loop.next_trial()
        assert not resumed
        study.tell(trial, trial.params["x"])
        params.append(trial.params["x"])
    if reseed:
        assert len(set(params)) == 4, params
    else:  # what the reseeding prevents
        assert params[0] == params[1], params


def test_two_workers_at_once_never_overshoot_n_trials(tmp_path):
    journal = tmp_path / "optuna.journal"
    journal_study(journal)
    n_trials = 7
    counts: dict[str, int] = {}

    def worker(wid: str) -> None:
        study = journal_study(journal)  # each worker its own view of the shared journal

        def run(trial, overrides):
            time.sleep(0.02)
            study.tell(trial, trial.params["x"])
            counts[wid] = counts.get(wid, 0) + 1
            return "COMPLETE"

        ow.WorkerLoop(study=study, n_trials=n_trials, worker_id=wid, lock=Path(str(journal) + ow.LOCK_SUFFIX),
                      new_overrides=lambda t: [f"x={t.suggest_float('x', 0, 1)}"], run=run,
                      alive=lambda w: True, say=lambda s: None).loop()

    threads = [threading.Thread(target=worker, args=(w,)) for w in ("w1", "w2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    trials = journal_study(journal).get_trials()
    assert len(trials) == n_trials and all(t.state.name == "COMPLETE" for t in trials)
    assert sum(counts.values()) == n_trials and set(counts) == {"w1", "w2"}
    assert {t.user_attrs[ow.WORKER_ATTR] for t in trials} == {"w1", "w2"}


def test_a_running_trial_of_a_dead_worker_is_taken_over_as_the_same_trial(tmp_path):
    journal = tmp_path / "optuna.journal"
    study = journal_study(journal)
    left = study.ask()
    left.suggest_float("x", 0, 1)
    left.set_user_attr("overrides", ["x=0.5"])
    left.set_user_attr(ow.WORKER_ATTR, "123_0")  # killed mid-trial
    alive_one = study.ask()
    alive_one.set_user_attr("overrides", ["x=0.1"])
    alive_one.set_user_attr(ow.WORKER_ATTR, "124_0")  # still running elsewhere
    local = study.ask()  # a local launcher (no worker) runs its cell now
    local.set_user_attr("overrides", ["x=0.2"])
    local.set_user_attr("cell", "c-local")
    ran = []

    def run(trial, overrides):
        ran.append((trial.number, overrides))
        study.tell(trial, 1.0)
        return "COMPLETE"

    ow.WorkerLoop(study=study, n_trials=4, worker_id="125_0", lock=tmp_path / "lock", new_overrides=lambda t: ["x=0.9"],
                  run=run, alive=lambda w: w == "124_0", elsewhere=lambda t: t.user_attrs.get("cell") == "c-local",
                  say=lambda s: None).loop()
    assert ran == [(left.number, ["x=0.5"]), (3, ["x=0.9"])]  # resumed, then one new: 4 trials, no more
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "RUNNING", "RUNNING", "COMPLETE"]


class StubLauncher:
    """The launcher as the sweeper's worker mode drives it, with a stand-in cell per trial: the cell
    fails when its threshold is listed in ``fail``, and reports 0.5 after each of its epochs."""

    def __init__(self, sweep: Path, fail=()) -> None:
        self.sweep = sweep
        self.fail = set(fail)
        self.on_plan = None
        self.launched: list[list[str]] = []

    def launch(self, jobs, initial_job_idx):
        rets = []
        for ov in jobs:
            self.launched.append(list(ov))
            cid = f"cell{len(self.launched):02d}"
            cell = cellstate.cell_dir(self.sweep, cid)
            cell.mkdir(parents=True, exist_ok=True)
            if self.on_plan is not None:
                self.on_plan(Plan(sweep_dir=self.sweep, plan_id="p", job_cells=[cid],
                                  cells=[PlannedCell(record=CellRecord(id=cid, overrides=list(ov)), config={})]))
            ret = JobReturn(overrides=list(ov), working_dir=str(cell), task_name="launcher")
            value = float(ov[0].split("=")[1])
            if any(f"{x}" == f"{value}" for x in self.fail):
                ret.status = JobStatus.FAILED
                ret.return_value = trial_launch.CellNotDone(f"cell {cid} is FAILED: boom")
            else:
                ret.status = JobStatus.COMPLETED
                ret.return_value = 0.5 + value / 10
            rets.append(ret)
        return rets

    def print_summary(self) -> None:
        pass


class EpochProgress:
    """Every cell has reported 0.5 after epochs 1 and 2; prune requests are noted."""

    def __init__(self) -> None:
        self.requests: list[Path] = []
        self.judged: dict = {}

    def metric_by_epoch(self, cell, name):
        return {1: 0.5, 2: 0.5}

    def request_prune(self, cell, reason):
        self.requests.append(Path(cell))

    def mark_judged(self, cell, epoch, poll_s):
        self.judged[cell] = epoch

    def clear_judged(self, cell):
        self.judged.pop(cell, None)


def study_run(sweep: Path, launcher, n_trials: int, pruner=None, threshold: str = "choice(0.3,0.6)"):
    sweeper = osw.OptunaSweeper(n_trials=n_trials, max_failure_rate=1.0,
                                sampler={"_target_": "optuna.samplers.RandomSampler", "seed": 0})
    sweeper.launcher = launcher
    space, fixed = osw.search_space([f"proxy.threshold={threshold}"])
    run = osw._StudyRun(sweeper, sweep, space, fixed, ["val/acc_best"], False, ["maximize"], pruner, 1, poll_s=0.05)
    run.progress_source = EpochProgress()
    return run


def test_a_worker_tells_complete_and_fail_and_refreshes_study_json_after_each_trial(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    run = study_run(sweep, StubLauncher(sweep, fail=["0.3"]), n_trials=4)
    snapshots = []
    record = run.record

    def record_and_look(study):
        d = record(study)
        snapshots.append(osw.read_study(sweep))  # what launcher.status reads, as written
        return d

    monkeypatch.setattr(run, "record", record_and_look)
    with pytest.raises(SystemExit) as e:
        run.work("900_0")
    assert e.value.code == 1  # a FAIL trial: the worker's job ends FAILED
    study = osw.load_study(sweep)
    by_value = {t.params["proxy.threshold"]: t.state.name for t in study.get_trials()}
    assert len(study.get_trials()) == 4 and by_value == {0.3: "FAIL", 0.6: "COMPLETE"}
    # Written when a trial starts (it shows RUNNING), after each tell, and at the end.
    assert [s["complete"] + s["failed"] for s in snapshots] == [0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [s["running"] for s in snapshots] == [1, 0] * 4 + [0] and snapshots[-1]["n_trials"] == 4


def test_a_prune_request_makes_a_pruned_trial(tmp_path):
    sweep = tmp_path / "sweep"
    launcher = StubLauncher(sweep, fail=["0.3"])  # the cell stopped at the request: not DONE
    run = study_run(sweep, launcher, n_trials=2, pruner=optuna.pruners.ThresholdPruner(lower=0.99),
                    threshold="choice(0.3)")
    run.work("901_0")  # PRUNED is no failure: the worker ends 0
    study = osw.load_study(sweep)
    assert [t.state.name for t in study.get_trials()] == ["PRUNED", "PRUNED"]
    assert all(t.intermediate_values == {1: 0.5, 2: 0.5} for t in study.get_trials())
    assert len(run.progress_source.requests) == 2 and osw.read_study(sweep)["pruned"] == 2


# ------------------------------------------------------------------------------------------ the real cluster

@pytest.fixture
def slurm_sweep(tmp_path: Path):
    """A sweep folder whose worker jobs are cancelled when the test ends, whatever happened."""
    from test_slurm import cluster_problem

    problem = cluster_problem()
    if problem is not None:
        if os.environ.get("PROXYATTENTION_REQUIRE_SLURM") == "1":
            pytest.fail(f"PROXYATTENTION_REQUIRE_SLURM=1 but no Slurm cluster: {problem}. `bash .ci/slurm.sh up` "
                        "starts one (root).")
        pytest.skip(f"no Slurm cluster: {problem} (`sudo bash .ci/slurm.sh up` starts a single-node one)")
    path = tmp_path / "sweep"
    yield path
    jobs = ow.read_workers(path)
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True)


@pytest.mark.slurm
def test_a_study_on_slurm_runs_in_two_workers_and_a_reissue_submits_nothing(slurm_sweep, tmp_path):
    from waiting import wait_for

    args = [sys.executable, "-m", "launcher", *SAVED, *TRIAL, "hydra/launcher=slurm", "hydra.sweeper.n_trials=2",
            "hydra.launcher.workers=2", "hydra.launcher.cpus_per_task=1", "hydra.launcher.heartbeat_s=2",
            "hydra.launcher.timeout_min=10", "proxy.schedule=1,p,1", f"hydra.sweep.dir={slurm_sweep}"]
    proc = subprocess.run(args, cwd=tmp_path, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = ow.read_workers(slurm_sweep)
    assert len(jobs) == 2 and all(j in proc.stdout for j in jobs) and "optuna.journal" in proc.stdout
    assert (slurm_sweep / "study.json").is_file()  # launcher.status shows the study before any worker starts
    wait_for(lambda: not ow.live_workers(slurm_sweep), 170, "the worker jobs to end", step=2.0)
    study = osw.load_study(slurm_sweep)
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE", "COMPLETE"], \
        "\n".join(p.read_text()[-2000:] for p in (slurm_sweep / "slurm").glob("*_log.*"))
    assert {t.user_attrs[ow.WORKER_ATTR] for t in study.get_trials()} <= set(jobs)
    status = json.loads(subprocess.run([sys.executable, "-m", "launcher.status", str(slurm_sweep), "--json"],
                                       text=True, capture_output=True, check=True).stdout)
    assert status["study"]["complete"] == 2 and status["study"]["workers"]["jobs"] == jobs
    cells = {c["id"]: c for c in status["cells"]}
    assert {t.user_attrs["cell"] for t in study.get_trials()} <= cells.keys()
    assert all(c["state"] == "DONE" for c in cells.values()) and len(cells) == 3  # two trials, one baseline
    again = subprocess.run(args, cwd=tmp_path, text=True, capture_output=True, timeout=300)
    assert again.returncode == 0 and "no worker to submit" in again.stdout, again.stdout + again.stderr
    assert ow.read_workers(slurm_sweep) == jobs


def test_the_failure_rate_counts_every_worker_of_the_command_not_one(tmp_path, capsys):
    """Two trials of a sibling worker (same job array) FAILED: this worker's first COMPLETE trial makes
    2 of 3 failed, over max_failure_rate=0.5, so it stops; a failure of another command's array does not
    count."""
    from optuna.trial import TrialState

    sweep = tmp_path / "sweep"
    run = study_run(sweep, StubLauncher(sweep), n_trials=8, threshold="choice(0.6)")
    run.s.max_failure_rate = 0.5
    study = run.open()
    for owner in ("902_1", "902_1", "700_0", "700_0"):
        t = study.ask()
        t.set_user_attr(ow.WORKER_ATTR, owner)
        study.tell(t, state=TrialState.FAIL)
    assert ow.command_failures(study, "902_0") == (2, 2) and ow.command_failures(study, "700_3") == (2, 2)
    assert ow.command_failures(study, "903_0") == (0, 0)
    run.work("902_0")
    mine = [t for t in osw.load_study(sweep).get_trials() if t.user_attrs.get(ow.WORKER_ATTR) == "902_0"]
    assert [t.state.name for t in mine] == ["COMPLETE"]  # then 2 of 3 FAILED > 0.5: no more trials
    assert "2 of the 3 trials the workers of job 902 finished FAILED" in capsys.readouterr().err


@pytest.mark.slurm
def test_a_worker_at_its_time_limit_is_requeued_and_resumes_its_own_trial(slurm_sweep, tmp_path):
    """1-minute limit, the warning 20 s before it, a cell of 190 epochs (minutes on one core): the worker
    stops its cell at a checkpoint, Slurm requeues the same job id, and the restarted worker takes the
    same trial back, its cell resuming from the epoch reached."""
    from waiting import wait_for

    args = [sys.executable, "-m", "launcher", *SAVED, "dataset=digits", "model=test_resnet", "explain.enabled=false",
            "hydra/launcher=slurm", "hydra.sweeper.n_trials=1", "hydra.launcher.workers=1",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.heartbeat_s=2", "hydra.launcher.timeout_min=1",
            "hydra.launcher.signal_delay_s=20", "hydra.launcher.max_requeues=10", "proxy.schedule=190",
            f"hydra.sweep.dir={slurm_sweep}"]
    proc = subprocess.run(args, cwd=tmp_path, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (job,) = ow.read_workers(slurm_sweep)

    def resumed_cell() -> Optional[Path]:
        study = osw.load_study(slurm_sweep)
        cell = study.get_trials()[0].user_attrs.get("cell") if study.get_trials() else None
        log = slurm_sweep / "cells" / str(cell) / "stderr.log"
        return log if cell and log.exists() and "resuming from" in log.read_text() else None

    log = wait_for(resumed_cell, 240, "the requeued worker to resume its trial's cell", step=2.0)
    text = log.read_text()
    assert text.count("===== attempt") == 2  # stopped once, at the limit, then resumed
    assert int(text.split("resuming from", 1)[1].split("after epoch", 1)[1].split()[0]) >= 1
    worker_log = "".join(f.read_text() for f in (slurm_sweep / "slurm").glob("*_log.out"))
    assert "Requeued job" in worker_log and f"worker {job}: resuming trial 0" in worker_log, worker_log[-3000:]
    study = osw.load_study(slurm_sweep)
    assert len(study.get_trials()) == 1 and study.get_trials()[0].user_attrs[ow.WORKER_ATTR] == job
    restarts = subprocess.run(["scontrol", "show", "job", job.split("_")[0]], capture_output=True, text=True).stdout
    assert "Restarts=0" not in restarts, restarts  # Slurm requeued the same job id
    assert ow.read_workers(slurm_sweep) == [job]  # nothing submitted anew
