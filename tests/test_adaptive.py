"""Adaptive sweeps (``hydra/sweeper=optuna``, launcher.optuna_sweeper, Optuna >= 4): the search-space
syntax, sampler and pruner from the command line, the saved sweep choosing the sweeper, trials that are
cells returning their validation objective (or FAIL / PRUNED), a study persisted in the sweep folder that a
re-issue continues without retraining and whose interrupted trial resumes as the same trial, pruning
between epochs, two objectives, and the Slurm backend taking an adaptive sweeper. Mostly on torch-free
stand-in cells; one real study on test_resnet."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fakecell import cells, runs

optuna = pytest.importorskip("optuna", minversion="4.0", reason="needs pip install -e '.[optuna]' (in [test])")

from launcher import optuna_sweeper as osw  # noqa: E402

SAVED = ["+sweep=optuna_proxy"]  # selects hydra/sweeper=optuna itself


def study_of(sweep: Path):
    """The study, opened as a user would: from what ``launcher.status --json`` reports."""
    out = subprocess.run([sys.executable, "-m", "launcher.status", str(sweep), "--json"], text=True,
                         capture_output=True, check=True).stdout
    s = json.loads(out)["study"]
    storage = s["storage"]
    if s["storage_kind"] == "journal":
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        storage = JournalStorage(JournalFileBackend(storage))
    return optuna.load_study(study_name=s["name"], storage=storage), s


def states(study) -> list[str]:
    return [t.state.name for t in study.get_trials()]


def hydra_cfg(*overrides: str, cwd: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "launcher", "model=test_resnet", *overrides, "--cfg", "hydra"],
                          cwd=cwd, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return yaml.safe_load(proc.stdout)["hydra"]


# ------------------------------------------------------------------------------------------ the search space

def test_search_space_syntax_of_hydras_optuna_sweeper():
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    params = {"a": "interval(0.1, 0.9)", "b": "int(interval(1, 8))", "c": "tag(log, interval(0.0001, 0.1))",
              "d": "choice(blend, mean, 'x,y')", "e": "range(1, 5)", "f": "range(0.1, 0.5, 0.1)",
              "g": "shuffle(range(1, 4))", "h": "blend", "i": "4,8", "j": "interval(0, 1)"}
    space, fixed = osw.search_space([f"{k}={v}" for k, v in params.items()] + ["j=0.5", "+k=interval(1,2)"])
    assert space["a"] == FloatDistribution(0.1, 0.9)
    assert space["b"] == IntDistribution(1, 8)
    assert space["c"] == FloatDistribution(0.0001, 0.1, log=True)
    assert space["d"] == CategoricalDistribution(["blend", "mean", "x,y"])
    assert space["e"] == IntDistribution(1, 4)  # as Hydra's range: the stop is excluded
    f = space["f"]
    assert isinstance(f, FloatDistribution) and f.step == pytest.approx(0.1) and f.high == pytest.approx(0.4)
    assert isinstance(space["g"], CategoricalDistribution) and sorted(space["g"].choices) == [1, 2, 3]
    assert space["i"] == CategoricalDistribution([4, 8])
    assert space["+k"] == FloatDistribution(1.0, 2.0)
    assert fixed == {"h": "h=blend", "j": "j=0.5"}  # the later line fixes j: the command line wins
    with pytest.raises(osw.SearchSpaceError):
        osw.search_space(["a=glob(*)"])


def test_suggested_values_parse_back_as_overrides():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for v in ["blend", "x,y", "it's", "true", "1", 0.1234567890123, 3, True, None, "a b"]:
        o = parser.parse_overrides([f"k={osw.override_value(v)}"])[0]
        assert o.value() == v, (v, osw.override_value(v))


def test_the_grid_sampler_takes_its_grid_from_params():
    sweeper = osw.OptunaSweeper(sampler={"_target_": "optuna.samplers.GridSampler", "seed": None})
    space, _ = osw.search_space(["a=choice(1,2)", "b=range(0.1,0.35,0.1)"])
    sampler = sweeper.make_sampler(space)
    assert isinstance(sampler, optuna.samplers.GridSampler)
    with pytest.raises(osw.SearchSpaceError):
        sweeper.make_sampler(osw.search_space(["a=interval(0,1)"])[0])


# ------------------------------------------------------------------------------------------ configuration

def test_the_saved_sweep_selects_the_sweeper_without_hydra_sweeper_on_the_command_line(tmp_path):
    assert hydra_cfg(cwd=tmp_path)["sweeper"]["_target_"].endswith(".CellSweeper")  # grids stay the default
    sweeper = hydra_cfg(*SAVED, cwd=tmp_path)["sweeper"]
    assert sweeper["_target_"] == "hydra_plugins.proxyattention_launcher.OptunaSweeper"
    assert sweeper["sampler"]["_target_"] == "optuna.samplers.TPESampler" and sweeper["sampler"]["seed"] == 0
    assert sweeper["params"]["proxy.threshold"] == "interval(0.1, 0.9)" and sweeper["pruner"] is None
    plain = hydra_cfg("hydra/sweeper=optuna", cwd=tmp_path)["sweeper"]  # without a saved sweep
    assert plain["_target_"].endswith(".OptunaSweeper") and plain["n_trials"] == 20


def test_sampler_and_pruner_from_the_command_line(tmp_path):
    def made(*overrides):
        cfg = hydra_cfg(*SAVED, *overrides, cwd=tmp_path)["sweeper"]
        kw = {k: v for k, v in cfg.items() if k not in ("_target_", "_recursive_")}
        sweeper = osw.OptunaSweeper(**kw)
        return sweeper.make_sampler({}), sweeper.make_pruner(multi=False)

    sampler, pruner = made("hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,lower:0.99}")
    assert isinstance(sampler, optuna.samplers.TPESampler) and isinstance(pruner, optuna.pruners.ThresholdPruner)
    assert pruner._lower == 0.99
    sampler, pruner = made("hydra/sweeper/sampler=random", "hydra/sweeper/pruner=median",
                           "hydra.sweeper.pruner.n_warmup_steps=2", "hydra.sweeper.sampler.seed=7")
    assert type(sampler) is optuna.samplers.RandomSampler and isinstance(pruner, optuna.pruners.MedianPruner)
    assert pruner._n_warmup_steps == 2
    sampler, pruner = made("hydra.sweeper.sampler.n_startup_trials=3")
    assert sampler._n_startup_trials == 3 and pruner is None  # no pruner unless one is given


def test_configuration_mistakes_are_refused_in_one_line(fake):
    for overrides, words in [
        (["hydra.sweeper.direction=up"], "maximize or minimize"),
        (["hydra.sweeper.directions=[maximize,maximize]"], "one metric per direction"),
        (["hydra.sweeper.directions=[maximize,maximize]", "hydra.launcher.objective=[val/acc_best,val/acc]",
          "hydra/sweeper/pruner=median"], "multi-objective"),
        (["hydra.launcher.objective=[val/acc_best,test/acc]"], "hydra.launcher.objective"),
    ]:
        proc = fake(*SAVED, *overrides)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert words in proc.stderr, (overrides, proc.stderr[-2000:])
        assert not fake.sweep.exists()


# ------------------------------------------------------------------------------------------ studies of stand-in cells

@pytest.mark.floors
def test_trials_are_cells_returning_their_validation_objective(fake):
    proc = fake(*SAVED, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", "hydra.launcher.workers=2",
                "hydra.sweeper.sampler.n_startup_trials=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = cells(fake.sweep)
    proxies = [c for c in got.values() if c["role"] == "proxy"]
    assert len(proxies) == 4 and all(c["state"] == "DONE" for c in got.values())
    study, summary = study_of(fake.sweep)
    assert states(study) == ["COMPLETE"] * 4 and summary["complete"] == 4 and summary["n_trials"] == 4
    # The stand-in's val/acc_best is 0.5 + threshold / 10: what Optuna was told is exactly that.
    for t in study.get_trials():
        assert t.value == pytest.approx(0.5 + t.params["proxy.threshold"] / 10)
        assert t.user_attrs["cell"] in got and f"proxy.threshold={t.params['proxy.threshold']!r}" in \
            t.user_attrs["overrides"]
    thresholds = [float(o.split("=")[1]) for c in proxies for o in c["overrides"] if o.startswith("proxy.threshold=")]
    best = yaml.safe_load((fake.sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(0.5 + max(thresholds) / 10) == pytest.approx(summary["best_value"])
    assert best["best_params"]["proxy.threshold"] == pytest.approx(max(thresholds))
    assert "study 'proxy_attention': 4 of 4 trials (4 COMPLETE)" in proc.stdout
    assert proc.stdout.count("cells: ") == 1  # one summary for the whole study, not one per batch


def test_reissuing_trains_nothing_and_more_trials_continue_the_study(fake):
    args = (*SAVED, "hydra.sweeper.n_trials=3")
    assert fake(*args).returncode == 0
    first = cells(fake.sweep)
    again = fake(*args)
    assert again.returncode == 0 and "RUNNING" not in again.stdout, again.stdout[-2000:]
    assert cells(fake.sweep).keys() == first.keys() and all(runs(fake.sweep, cid) == 1 for cid in first)
    assert len(study_of(fake.sweep)[0].trials) == 3  # n_trials is the study's total
    more = fake(*SAVED, "hydra.sweeper.n_trials=5")
    assert more.returncode == 0
    grown = cells(fake.sweep)
    assert first.keys() < grown.keys() and all(runs(fake.sweep, cid) == 1 for cid in grown)
    assert sum(c["role"] == "proxy" for c in grown.values()) == 5  # new trials, not the first ones replayed
    study, _ = study_of(fake.sweep)
    assert states(study) == ["COMPLETE"] * 5 and len({t.user_attrs["cell"] for t in study.trials}) == 5


def test_a_custom_search_space_suggests_more_parameters(fake):
    (fake.sweep.parent / "fakecell" / "space.py").write_text(
        "def extend(cfg, trial):\n"
        "    trial.suggest_categorical('proxy.mode', ['mean', 'max'])\n")
    proc = fake(*SAVED, "hydra.sweeper.n_trials=2", "hydra.sweeper.custom_search_space=space.extend")
    assert proc.returncode == 0, proc.stderr[-3000:]
    study, _ = study_of(fake.sweep)
    proxies = [c for c in cells(fake.sweep).values() if c["role"] == "proxy"]
    for t in study.trials:
        assert t.params["proxy.mode"] in ("mean", "max") and f"proxy.mode={t.params['proxy.mode']}" in \
            t.user_attrs["overrides"]
    assert all(any(o.startswith("proxy.mode=") for o in c["overrides"]) for c in proxies)


def test_a_sqlite_url_is_the_storage_on_request(fake):
    proc = fake(*SAVED, "hydra.sweeper.n_trials=2", "hydra.sweeper.storage=sqlite:///study.db")
    assert proc.returncode == 0, proc.stderr[-3000:]
    db = fake.sweep.parent / "study.db"  # relative to where the command ran, made absolute in study.json
    study, summary = study_of(fake.sweep)
    assert summary["storage"] == f"sqlite:///{db}" and db.is_file() and not (fake.sweep / "optuna.journal").exists()
    assert states(study) == ["COMPLETE"] * 2


def test_a_trial_whose_parameters_are_a_done_cells_gets_its_value_without_training(fake):
    """A fresh study (another study name) over the same store: its trials hit DONE cells."""
    args = (*SAVED, "hydra.sweeper.n_trials=2", "hydra/sweeper/sampler=random")
    assert fake(*args).returncode == 0
    first = cells(fake.sweep)
    other = fake.sweep.parent / "other"
    proc = fake(*args, sweep_dir=other)  # the same seed, a new study: the same parameters
    assert proc.returncode == 0
    assert cells(other).keys() == first.keys() and all(runs(other, cid) == 1 for cid in first)
    assert states(study_of(other)[0]) == ["COMPLETE"] * 2


def test_the_gain_over_the_paired_baseline_is_the_objective_on_request(fake):
    proc = fake(*SAVED, "hydra.sweeper.n_trials=2", "hydra.launcher.objective_vs_baseline=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    study, _ = study_of(fake.sweep)
    for t in study.trials:
        assert t.value == pytest.approx(t.params["proxy.threshold"] / 10)  # minus the baseline's 0.5
        assert t.user_attrs["baseline"] in cells(fake.sweep)


def test_a_failed_cell_is_a_failed_trial(fake):
    # Every threshold Optuna could pick fails: the stand-in fails any threshold listed in FAKE_FAIL.
    proc = fake(*SAVED, "hydra.sweeper.n_trials=2", "proxy.threshold=0.3", env={"FAKE_FAIL": "0.3"})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "is FAILED" in proc.stderr, proc.stderr[-3000:]
    study, summary = study_of(fake.sweep)
    # max_failure_rate 0.25 of the saved sweep: the first FAIL stops the study before its second trial.
    assert states(study) == ["FAIL"] and summary["failed"] == 1
    assert "max_failure_rate" in proc.stderr


def test_a_dry_run_shows_the_first_batch_only_and_writes_nothing(fake):
    proc = fake(*SAVED, "hydra.launcher.dry_run=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "only its first batch is shown" in proc.stdout and not fake.sweep.exists()


def test_an_interrupted_trial_resumes_as_the_same_trial(fake):
    args = (*SAVED, "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1")
    proc = fake(*args, env={"FAKE_SLEEP": "4"}, background=True)
    cells_dir = fake.sweep / "cells"
    deadline = time.time() + 120
    # baseline and trial 0 done, trial 1's cell started: interrupt it
    while len(list(cells_dir.glob("*/runs.log"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    study, _ = study_of(fake.sweep)
    left = [t for t in study.trials if t.state.name == "RUNNING"]
    assert [t.number for t in left] == [1] and left[0].user_attrs["cell"], states(study)
    cid = left[0].user_attrs["cell"]
    assert runs(fake.sweep, cid) == 1 and cells(fake.sweep)[cid]["state"] == "CANCELLED"

    again = fake(*args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming 1 interrupted trial(s) (1)" in again.stdout
    study, _ = study_of(fake.sweep)
    assert states(study) == ["COMPLETE"] * 3  # no fourth trial: trial 1 was told, as trial 1
    assert study.trials[1].user_attrs["cell"] == cid and runs(fake.sweep, cid) == 2
    assert cells(fake.sweep)[cid]["state"] == "DONE"


def test_a_running_trial_without_parameters_is_failed_and_replaced(fake):
    """A trial asked but never given its overrides (the command died in between) cannot be resumed."""
    assert fake(*SAVED, "hydra.sweeper.n_trials=1").returncode == 0
    study, _ = study_of(fake.sweep)
    study.ask()  # RUNNING, no overrides
    proc = fake(*SAVED, "hydra.sweeper.n_trials=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert states(study_of(fake.sweep)[0]) == ["COMPLETE", "FAIL", "COMPLETE"]


# ------------------------------------------------------------------------------------------ pruning

class FakeProgress:
    """A progress source of per-epoch values set by the test; records the prune requests."""

    def __init__(self, values: dict) -> None:
        self.values = values  # {cell: {epoch: value}}
        self.requests: list = []
        self.judged: dict = {}  # cell -> the epoch the monitor marked judged

    def metric_by_epoch(self, cell, name):
        return dict(self.values.get(cell, {}))

    def request_prune(self, cell, reason):
        self.requests.append((cell, reason))

    def mark_judged(self, cell, epoch, poll_s):
        self.judged[cell] = epoch

    def clear_judged(self, cell):
        self.judged.pop(cell, None)


def test_the_monitor_reports_each_epoch_and_asks_the_pruner():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    good, bad = study.ask(), study.ask()
    cells_ = {"good": Path("good"), "bad": Path("bad")}
    source = FakeProgress({cells_["good"]: {1: 0.6}, cells_["bad"]: {1: 0.7}})
    monitor = osw.PruneMonitor(source, "val/acc_best", prune=True, say=lambda line: None)
    monitor.watch([osw.Watched(good, cells_["good"]), osw.Watched(bad, cells_["bad"])])
    monitor.poll()
    assert source.requests == [] and monitor.pruned(bad.number) is None
    assert source.judged == {cells_["good"]: 1, cells_["bad"]: 1}  # each cell's epochs so far, judged
    source.values[cells_["bad"]][2] = 0.4  # below the threshold after epoch 2
    source.values[cells_["good"]][2] = 0.8
    monitor.poll()
    assert [c for c, _ in source.requests] == [cells_["bad"]] and "after epoch 2" in source.requests[0][1]
    assert monitor.pruned(bad.number) == 2 and monitor.pruned(good.number) is None
    assert study.trials[good.number].intermediate_values == {1: 0.6, 2: 0.8}
    monitor.poll()
    assert len(source.requests) == 1  # asked once


def test_the_monitor_reports_the_gain_over_the_baselines_same_epoch_and_never_prunes_without_a_pruner():
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    cell, base = Path("proxy"), Path("base")
    source = FakeProgress({cell: {1: 0.6, 2: 0.7}, base: {1: 0.5}})
    monitor = osw.PruneMonitor(source, "val/acc_best", prune=False, say=lambda line: None)
    monitor.watch([osw.Watched(trial, cell, base)])
    monitor.poll()
    assert study.trials[0].intermediate_values == {1: pytest.approx(0.1)}  # epoch 2 waits for the baseline
    source.values[base][2] = 0.9
    monitor.poll()
    assert study.trials[0].intermediate_values == {1: pytest.approx(0.1), 2: pytest.approx(-0.2)}
    assert source.requests == []


PRUNABLE_CELL = r'''
import json, os, sys, time, yaml
from launcher import progress
cell = sys.argv[1]
cfg = yaml.safe_load(open(os.path.join(cell, "config.yaml")))
with open(os.path.join(cell, "runs.log"), "a") as f:
    f.write(f"{os.getpid()}\n")
epochs = sum(int(s) for s in str(cfg["proxy"]["schedule"]).split(",") if s.strip().isdigit())
thr = cfg["proxy"]["threshold"] if cfg["proxy"]["enabled"] else 0.0
history, started = [], time.time()
for epoch in range(1, epochs + 1):
    request = progress.prune_request(cell)
    if request is not None:
        json.dump({"status": "pruned", "metrics": {"val/acc_best": history[-1]["val/acc"] if history else 0.0},
                   "history": history, "pruned": {"epoch": epoch - 1, "epochs": epochs, **request}},
                  open(os.path.join(cell, "result.json"), "w"))
        sys.exit(0)
    time.sleep(float(os.environ.get("FAKE_EPOCH_S", "1")))
    history.append({"epoch": epoch, "val/acc": 0.5 + thr / 10 * epoch / epochs})
    progress.write_progress(cell, epoch=epoch, epochs=epochs, history=history, epoch_s=[1.0] * epoch,
                            started=started)
    progress.await_judgement(cell, epoch)
json.dump({"status": "done", "metrics": {"test/acc": 0.5, "val/acc_best": history[-1]["val/acc"],
           "proxy/images": 1}, "history": history, "run": {"epochs": epochs},
           "timing": {"train_s": 0.1, "total_s": 0.2}}, open(os.path.join(cell, "result.json"), "w"))
'''


def test_a_pruner_stops_trials_between_epochs_and_they_are_pruned_trials(fake):
    (fake.sweep.parent / "fakecell" / "fake_cell.py").write_text(PRUNABLE_CELL)
    args = (*SAVED, "hydra.sweeper.n_trials=2", "proxy.schedule='2,p,2'",
            "hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,lower:0.99}")
    proc = fake(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study, summary = study_of(fake.sweep)
    assert states(study) == ["PRUNED", "PRUNED"] and summary["pruned"] == 2
    got = cells(fake.sweep)
    for t in study.trials:
        cell = fake.sweep / "cells" / t.user_attrs["cell"]
        assert (cell / "prune.json").is_file() and got[t.user_attrs["cell"]]["state"] == "PRUNED"
        # Below the threshold after epoch 1: asked to stop then, and it did, before training epoch 2.
        assert t.intermediate_values.keys() == {1}
        assert json.loads((cell / "result.json").read_text())["pruned"]["epoch"] == 1
        assert not (cell / "judged.json").exists()  # the monitor took its marks away when it stopped
    assert [c["state"] for c in got.values() if c["role"] == "baseline"] == ["DONE"]  # a baseline is never pruned
    assert summary["epochs_not_trained"] > 0 and "pruning saved" in proc.stdout
    again = fake(*args)
    assert again.returncode == 0 and all(runs(fake.sweep, cid) == 1 for cid in got)


def test_a_trial_whose_cell_is_a_baseline_is_never_pruned(fake):
    """Without a proxy step a proxy job is its own baseline (one cell): pruning it would take the baseline
    of every other trial with it."""
    (fake.sweep.parent / "fakecell" / "fake_cell.py").write_text(PRUNABLE_CELL)
    proc = fake(*SAVED, "hydra.sweeper.n_trials=1", "proxy.schedule='3'",
                "hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,lower:0.99}",
                env={"FAKE_EPOCH_S": "0.7"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert states(study_of(fake.sweep)[0]) == ["COMPLETE"]
    assert [c["state"] for c in cells(fake.sweep).values()] == ["DONE"]


# ------------------------------------------------------------------------------------------ two objectives

def test_two_objectives_give_two_values_per_trial_and_a_pareto_front(fake):
    proc = fake(*SAVED, "hydra.sweeper.n_trials=3", "hydra.sweeper.directions=[maximize,minimize]",
                "hydra.launcher.objective=[val/acc_best,proxy/images]")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study, summary = study_of(fake.sweep)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    for t in study.trials:
        assert t.values == [pytest.approx(0.5 + t.params["proxy.threshold"] / 10), 1.0]
    assert summary["best_value"] is None and summary["pareto_front"]
    assert yaml.safe_load((fake.sweep / "optimization_results.yaml").read_text())["solutions"]


# ------------------------------------------------------------------------------------------ Slurm, a real study

def test_slurm_takes_an_adaptive_sweeper(monkeypatch):
    """hydra/launcher=slurm no longer refuses a study: it submits worker jobs (tests/test_adaptive_slurm.py)."""
    from omegaconf import OmegaConf

    from launcher import slurm

    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")
    slurm.check_options(OmegaConf.create({"timeout_min": 60}), adaptive=True)  # no ValueError
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="no sbatch"):  # what it still refuses: no Slurm here
        slurm.check_options(OmegaConf.create({"timeout_min": 60}), adaptive=True)


@pytest.mark.slow
def test_a_real_study_on_test_resnet_persists_and_reissues_nothing(tmp_path):
    sweep = tmp_path / "optuna"
    args = [sys.executable, "-m", "launcher", *SAVED, "model=test_resnet", "hydra.sweeper.n_trials=3",
            "hydra.sweeper.n_jobs=2", "hydra.launcher.workers=2", "proxy.schedule=1,p,1", "explain.enabled=false",
            f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(args, cwd=tmp_path, text=True, capture_output=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (sweep / "optuna.journal").is_file()
    study, _ = study_of(sweep)
    assert states(study) == ["COMPLETE"] * 3
    status = json.loads(subprocess.run([sys.executable, "-m", "launcher.status", str(sweep), "--json"],
                                       text=True, capture_output=True, check=True).stdout)
    proxies = [c for c in status["cells"] if c["role"] == "proxy"]
    assert len(proxies) == 3
    assert all(c["state"] == "DONE" and isinstance(c["metrics"]["val/acc_best"], float) for c in status["cells"])
    assert {t.value for t in study.trials} == {c["metrics"]["val/acc_best"] for c in proxies}
    stamps = {c["id"]: (Path(c["dir"]) / "result.json").stat().st_mtime_ns for c in status["cells"]}
    again = subprocess.run(args, cwd=tmp_path, text=True, capture_output=True, timeout=600)
    assert again.returncode == 0 and "RUNNING" not in again.stdout
    assert {c["id"]: (Path(c["dir"]) / "result.json").stat().st_mtime_ns for c in status["cells"]} == stamps
    report = subprocess.run([sys.executable, "-m", "proxyattention.report", str(sweep)], cwd=tmp_path, text=True,
                            capture_output=True, timeout=600)
    assert report.returncode == 0, report.stderr[-3000:]
    assert (sweep / "report" / "figures" / "search.png").is_file()
    assert "## Search" in (sweep / "report" / "report.md").read_text()


HYDRA_OPTUNA_SWEEPER_STYLE = """\
# @package _global_
# Written for hydra-optuna-sweeper 1.2/1.3, as its documentation shows: it runs unchanged.
defaults:
  - override /hydra/sweeper: optuna
  - override /hydra/sweeper/sampler: tpe
hydra:
  sweeper:
    sampler:
      seed: 123
    direction: maximize
    study_name: written_for_the_plugin
    storage: null
    n_trials: 3
    n_jobs: 1
    max_failure_rate: 0.0
    params:
      proxy.threshold: range(0.1, 0.9, step=0.2)
      proxy.weight: choice(0.5, 0.8)
      proxy.subset: interval(0.5, 1.0)
"""


def test_a_saved_sweep_written_for_hydra_optuna_sweeper_runs_unchanged(fake, tmp_path):
    configs = tmp_path / "my-configs" / "sweep"
    configs.mkdir(parents=True)
    (configs / "theirs.yaml").write_text(HYDRA_OPTUNA_SWEEPER_STYLE)
    proc = fake("--config-dir", str(configs.parent), "+sweep=theirs")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study, summary = study_of(fake.sweep)
    assert summary["name"] == "written_for_the_plugin" and states(study) == ["COMPLETE"] * 3
    for t in study.get_trials():
        assert round(t.params["proxy.threshold"], 6) in (0.1, 0.3, 0.5, 0.7)  # range: stop excluded
        assert t.params["proxy.weight"] in (0.5, 0.8) and 0.5 <= t.params["proxy.subset"] <= 1.0
