"""A two-objective search in the report: the Pareto front (pure function: both directions, ties, NaN),
and the report of a two-objective study sweep folder (a persisted Optuna journal, ``study.json``,
``multirun.yaml`` and hand-made DONE cells) — the figure and the table of Pareto-optimal trials, read
with optuna and, without it, from the cells."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from proxyattention.analysis.figures import pareto_front
from proxyattention.analysis.report import PARETO_FIGURE, ReportConfig, build_report
from proxyattention.identity import baseline_of, cell_id

# ------------------------------------------------------------------------------------------ the front

POINTS = [(1.0, 5.0), (2.0, 4.0), (3.0, 1.0), (2.0, 2.0), (0.5, 0.5), (3.0, 1.0)]


@pytest.mark.parametrize("directions, front", [
    (["maximize", "maximize"], [0, 1, 2, 5]),  # (3, 1) twice: equal points both stay
    (["maximize", "minimize"], [2, 4, 5]),
    (["minimize", "maximize"], [0, 4]),
    (["minimize", "minimize"], [4]),
])
def test_front_of_a_known_point_set_in_every_direction(directions, front):
    assert pareto_front(POINTS, directions) == front


def test_front_ties_nan_and_mistakes():
    # A point equal in one objective and worse in the other is dominated; equal in both is not.
    assert pareto_front([(1, 1), (1, 2), (1, 2)], ["maximize", "maximize"]) == [1, 2]
    assert pareto_front([(1, 1), (1, 2), (1, 2)], ["maximize", "minimize"]) == [0]
    assert pareto_front([(2, 2), (2, 2)], ["minimize", "minimize"]) == [0, 1]
    # NaN is never on the front and dominates nothing.
    assert pareto_front([(math.nan, 9), (1, 1), (0, 0)], ["maximize", "maximize"]) == [1]
    assert pareto_front([], ["maximize", "minimize"]) == []
    with pytest.raises(ValueError, match="direction"):
        pareto_front([(1, 1)], ["maximize", "up"])


# ------------------------------------------------------------------------------------------ the report

# proxy.threshold → (val/acc_best, val/explain/deletion): maximize the first, minimize the second.
TRIALS = {0.2: (0.80, 0.30), 0.3: (0.85, 0.35), 0.4: (0.85, 0.35), 0.5: (0.78, 0.40), 0.6: (0.90, 0.50),
          0.7: (0.84, 0.36)}
FRONT = [0.6, 0.3, 0.4, 0.2]  # best first by val/acc_best (the tie 0.3 / 0.4 in trial order)
NAMES = ["val/acc_best", "val/explain/deletion"]
DIRECTIONS = ["maximize", "minimize"]


@pytest.fixture
def study_sweep(tmp_path, trial_config, trial_cell):
    """A two-objective study of six COMPLETE trials (each a DONE cell), one PRUNED and one FAIL trial."""
    optuna = pytest.importorskip("optuna", minversion="4.0")
    from optuna.distributions import FloatDistribution
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState, create_trial

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    trial_cell(sweep, baseline_of(trial_config(0.2)), {"val/acc_best": 0.8, "val/explain/deletion": 0.4})
    journal = sweep / "optuna.journal"
    study = optuna.create_study(study_name="two", directions=DIRECTIONS,
                                storage=JournalStorage(JournalFileBackend(str(journal))))
    dist = {"proxy.threshold": FloatDistribution(0.1, 0.9)}
    for thr, (acc, dele) in TRIALS.items():
        cid = trial_cell(sweep, trial_config(thr), {"val/acc_best": acc, "val/explain/deletion": dele})
        study.add_trial(create_trial(params={"proxy.threshold": thr}, distributions=dist, values=[acc, dele],
                                     user_attrs={"cell": cid}))
    study.add_trial(create_trial(params={"proxy.threshold": 0.8}, distributions=dist, state=TrialState.PRUNED))
    study.add_trial(create_trial(params={"proxy.threshold": 0.9}, distributions=dist, state=TrialState.FAIL))
    front = [{"trial": t.number, "values": list(t.values), "params": dict(t.params), "cell": t.user_attrs["cell"]}
             for t in study.best_trials]
    (sweep / "study.json").write_text(json.dumps({
        "name": "two", "storage": str(journal), "storage_kind": "journal", "directions": DIRECTIONS,
        "objective": NAMES, "objective_vs_baseline": False, "n_trials": 8, "pareto_front": front}))
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"_target_": "launcher.optuna_sweeper.OptunaSweeper", "directions": DIRECTIONS,
                    "params": {"proxy.threshold": "interval(0.1, 0.9)"}},
        "launcher": {"objective": NAMES}}}))
    return sweep


def _pareto_rows(md: str) -> list[list[str]]:
    lines = md.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("| trial | cell | val/acc_best (max)"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _check_report(sweep: Path, source: str, trial_config) -> str:
    md = build_report(sweep, ReportConfig(maps=0)).read_text()
    assert "### Pareto front" in md and f"6 COMPLETE trials (from {source})" in md
    assert f"![Pareto front of val/acc_best and val/explain/deletion](figures/{PARETO_FIGURE})" in md
    with Image.open(sweep / "report" / "figures" / PARETO_FIGURE) as im:
        assert im.size[0] > 300 and im.size[1] > 200
    rows = _pareto_rows(md)
    numbers = {thr: i for i, thr in enumerate(TRIALS)}  # trial number = order of addition
    assert [r[0] for r in rows] == [str(numbers[t]) for t in FRONT]
    assert [(float(r[2]), float(r[3])) for r in rows] == [TRIALS[t] for t in FRONT]
    assert [r[4] for r in rows] == [f"`proxy.threshold={t:.4g}`" for t in FRONT]
    assert [r[1] for r in rows] == [f"`{cell_id(trial_config(t))}`" for t in FRONT]
    assert "4 Pareto-optimal trials" in md
    return md


def test_the_report_draws_the_pareto_front_of_a_two_objective_study(study_sweep, trial_config):
    _check_report(study_sweep, "the persisted study", trial_config)


def test_without_optuna_the_front_comes_from_the_cells(study_sweep, monkeypatch, trial_config):
    for name in [m for m in sys.modules if m == "optuna" or m.startswith("optuna.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    _check_report(study_sweep, "the cells' results", trial_config)


def test_a_single_objective_study_has_no_pareto_front(study_sweep):
    (study_sweep / "study.json").unlink()
    (study_sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"_target_": "launcher.optuna_sweeper.OptunaSweeper", "direction": "maximize",
                    "params": {"proxy.threshold": "interval(0.1, 0.9)"}},
        "launcher": {"objective": "val/acc_best"}}}))
    md = build_report(study_sweep, ReportConfig(maps=0)).read_text()
    assert "## Search" in md and "Pareto" not in md and "Best trial" in md
    assert not (study_sweep / "report" / "figures" / PARETO_FIGURE).exists()


def test_the_report_of_a_two_objective_study_run_by_the_sweeper(fake):
    """The sweeper's own study.json, multirun.yaml and journal (stand-in cells: ``proxy/images`` is 1 for
    every trial, so the front is the trial of the highest ``val/acc_best``)."""
    pytest.importorskip("optuna", minversion="4.0")
    proc = fake("+sweep=optuna_proxy", "hydra.sweeper.n_trials=3", "hydra.sweeper.directions=[maximize,minimize]",
                "hydra.launcher.objective=[val/acc_best,proxy/images]")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    md = build_report(fake.sweep, ReportConfig(maps=0)).read_text()
    assert "3 COMPLETE trials (from the persisted study)" in md
    assert (fake.sweep / "report" / "figures" / PARETO_FIGURE).is_file()
    study = json.loads((fake.sweep / "study.json").read_text())
    want = sorted(study["pareto_front"], key=lambda p: (-p["values"][0], p["trial"]))
    lines = md.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("| trial | cell | val/acc_best (max) | proxy/images"))
    rows = [[c.strip() for c in x.strip("|").split("|")] for x in lines[start + 2:start + 2 + len(want)]]
    assert [(int(r[0]), r[1]) for r in rows] == [(p["trial"], f"`{p['cell']}`") for p in want]
    assert not lines[start + 2 + len(want)].startswith("|")


def test_without_optuna_a_gain_study_takes_each_cells_gain_over_its_baseline(study_sweep, monkeypatch):
    record = json.loads((study_sweep / "study.json").read_text())
    (study_sweep / "study.json").write_text(json.dumps({**record, "objective_vs_baseline": True}))
    monkeypatch.setitem(sys.modules, "optuna", None)
    md = build_report(study_sweep, ReportConfig(maps=0)).read_text()
    assert "gain over the paired baseline" in md
    rows = _pareto_rows(md)
    assert [(float(r[2]), float(r[3])) for r in rows] == [
        pytest.approx((TRIALS[t][0] - 0.8, TRIALS[t][1] - 0.4)) for t in FRONT]  # the baseline: 0.8, 0.4
