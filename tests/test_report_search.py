"""The report of a single-objective search (a persisted Optuna journal, ``study.json``, ``multirun.yaml``
and hand-made cells; three continuous parameters, one PRUNED and one FAIL trial): the optimisation
history, the parameter importances (and the line saying why they are absent without optuna), the best
trial beside its paired baseline with the interval or the word that it needs seeds, labels that name
every searched key rounded, and the "By <key>" tables of searched keys binned."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from PIL import Image

from proxyattention.analysis.figures import running_best
from proxyattention.analysis.report import HISTORY_FIGURE, MAX_BY_ROWS, ReportConfig, build_report
from proxyattention.identity import baseline_of, cell_id

KEYS = ("proxy.subset", "proxy.threshold", "proxy.weight")
# (threshold, weight, subset) → (val/acc_best, test/acc); the raw floats a sampler suggests.
COMPLETE = [
    ((0.41234567890123456, 0.73312345678901234, 0.16393245237809825), (0.86, 0.87)),
    ((0.25871234098712340, 0.11298734509812340, 0.92837465019283740), (0.80, 0.84)),
    ((0.68712340987123409, 0.52341098712340987, 0.47109871234098712), (0.89, 0.86)),
    ((0.13987123409871234, 0.88712340987123409, 0.61209871234098712), (0.93, 0.88)),
    ((0.79871234098712340, 0.30987123409871234, 0.28709871234098712), (0.84, 0.83)),
    ((0.55512340987123409, 0.64109871234098712, 0.79987123409871234), (0.82, 0.85)),
]
PRUNED_AT, FAIL_AT = 3, 5  # trial numbers of the PRUNED and the FAIL trial
BASELINE = {"val/acc_best": 0.84, "test/acc": 0.85}
LONG_FLOAT = re.compile(r"\d\.\d{7,}")


def _numbers() -> list[int]:
    """The trial number of each COMPLETE trial (the PRUNED and the FAIL trial take theirs)."""
    return [n for n in range(len(COMPLETE) + 2) if n not in (PRUNED_AT, FAIL_AT)]


def _make(sweep: Path, trial_config, trial_cell, direction: str = "maximize") -> dict:
    """The sweep folder; returns {trial number: cell id} of the COMPLETE trials."""
    optuna = pytest.importorskip("optuna", minversion="4.0")
    from optuna.distributions import FloatDistribution
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState, create_trial

    sweep.mkdir()
    trial_cell(sweep, baseline_of(trial_config(0.5)), dict(BASELINE))
    journal = sweep / "optuna.journal"
    study = optuna.create_study(study_name="search", direction=direction,
                                storage=JournalStorage(JournalFileBackend(str(journal))))
    dist = {k: FloatDistribution(0.1, 1.0) for k in KEYS}
    cells, todo = {}, iter(COMPLETE)
    for number in range(len(COMPLETE) + 2):
        if number == PRUNED_AT:
            study.add_trial(create_trial(params={k: 0.5 for k in KEYS}, distributions=dist, state=TrialState.PRUNED,
                                         intermediate_values={0: 0.61, 1: 0.64}))
            continue
        if number == FAIL_AT:
            cfg = trial_config(0.3141592653589793, 0.2718281828459045, 0.5772156649015329)
            d = sweep / "cells" / cell_id(cfg)
            d.mkdir(parents=True)
            (d / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
            (d / "status.json").write_text(json.dumps({"state": "FAILED", "attempts": 1,
                                                       "error": "RuntimeError: boom"}))
            study.add_trial(create_trial(params={k: 0.5 for k in KEYS}, distributions=dist, state=TrialState.FAIL,
                                         user_attrs={"cell": cell_id(cfg)}))
            continue
        (thr, weight, subset), (val, test) = next(todo)
        cid = trial_cell(sweep, trial_config(thr, weight, subset), {"val/acc_best": val, "test/acc": test})
        study.add_trial(create_trial(params={"proxy.threshold": thr, "proxy.weight": weight, "proxy.subset": subset},
                                     distributions=dist, value=val, user_attrs={"cell": cid}))
        cells[number] = cid
    best = study.best_trial
    (sweep / "study.json").write_text(json.dumps({
        "name": "search", "storage": str(journal), "storage_kind": "journal", "directions": [direction],
        "objective": ["val/acc_best"], "objective_vs_baseline": False, "n_trials": 8, "trials": 8,
        "complete": len(COMPLETE), "pruned": 1, "failed": 1, "running": 0, "best_value": best.value,
        "best_params": best.params, "best_trial": best.number, "best_cell": best.user_attrs["cell"]}))
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"_target_": "launcher.optuna_sweeper.OptunaSweeper", "direction": direction,
                    "params": {"proxy.threshold": "interval(0.1, 0.9)", "proxy.weight": "interval(0.1, 0.95)",
                               "proxy.subset": "interval(0.1, 1.0)", "proxy.schedule": "'1,p,1'"}},
        "launcher": {"objective": "val/acc_best"}}}))
    return cells


@pytest.fixture
def search_sweep(tmp_path, trial_config, trial_cell):
    sweep = tmp_path / "sweep"
    return sweep, _make(sweep, trial_config, trial_cell)


def _report(sweep: Path) -> str:
    return build_report(sweep, ReportConfig(maps=0)).read_text()


def _section(md: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    lines = md.splitlines()
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith("#") and len(lines[i].split(" ")[0]) <= len(level)), len(lines))
    return "\n".join(lines[start + 1:end])


def _table(text: str) -> list[list[str]]:
    """The body rows of the first markdown table in ``text``."""
    lines = text.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("|"))
    rows = []
    for x in lines[start + 2:]:
        if not x.startswith("|"):
            break
        rows.append([c.strip() for c in x.strip("|").split("|")])
    return rows


def test_running_best_follows_the_direction():
    assert running_best([0.5, math.nan, 0.7, 0.6]) == [0.5, 0.5, 0.7, 0.7]
    assert running_best([0.5, 0.7, 0.4, 0.6], minimize=True) == [0.5, 0.5, 0.4, 0.4]
    assert math.isnan(running_best([math.nan, 1.0])[0])


def test_the_history_figure_is_drawn_linked_and_lists_pruned_and_failed_trials(search_sweep):
    sweep, _ = search_sweep
    md = _report(sweep)
    history = _section(md, "### Optimisation history")
    assert f"](figures/{HISTORY_FIGURE})" in history
    with Image.open(sweep / "report" / "figures" / HISTORY_FIGURE) as im:
        assert im.size[0] > 300 and im.size[1] > 200
    assert f"{PRUNED_AT} (PRUNED, last reported 0.6400)" in history
    assert re.search(rf"\b{FAIL_AT} \(FAIL, cell `[0-9a-f]{{12}}`\)", history)
    assert "holds 8 trials of the 8 asked: 6 COMPLETE, 1 PRUNED, 1 FAIL" in md  # the whole study


def test_parameter_importances_with_optuna(search_sweep):
    md = _report(search_sweep[0])
    rows = _table(_section(md, "### Parameter importances"))
    assert sorted(r[0] for r in rows) == [f"`{k}`" for k in KEYS]
    shares = [float(r[1]) for r in rows]
    assert shares == sorted(shares, reverse=True) and sum(shares) == pytest.approx(1.0, abs=0.01)
    assert all(re.fullmatch(r"\d\.\d{3}", r[1]) for r in rows)


def test_without_optuna_one_line_says_why_history_and_importances_are_absent(search_sweep, monkeypatch):
    for name in [m for m in sys.modules if m == "optuna" or m.startswith("optuna.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    md = _report(search_sweep[0])
    assert _section(md, "### Parameter importances").strip() == (
        "_No parameter importances: optuna is not installed (pip install -e '.[optuna]'), so the study cannot "
        "be read._")
    assert "_No optimisation history: optuna is not installed" in md
    assert not (search_sweep[0] / "report" / "figures" / HISTORY_FIGURE).exists()
    assert "Best trial" in md  # still chosen, from the cells


def test_too_few_complete_trials_have_no_importances(tmp_path, trial_config, trial_cell, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "COMPLETE", COMPLETE[:1])
    monkeypatch.setattr(sys.modules[__name__], "FAIL_AT", 2)
    monkeypatch.setattr(sys.modules[__name__], "PRUNED_AT", 1)
    sweep = tmp_path / "sweep"
    _make(sweep, trial_config, trial_cell)
    md = _report(sweep)
    assert "_No parameter importances: they need at least 2 COMPLETE trials with different parameters " \
           "(1 COMPLETE, 1 distinct parameter set)._" in md


def _best_line(md: str) -> tuple[str, str]:
    best = _section(md, "### Best trial").strip().splitlines()
    return best[0], best[-1]


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_the_best_trial_is_chosen_on_validation_and_shown_beside_its_baseline(tmp_path, trial_config, trial_cell,
                                                                             direction):
    cells = _make(tmp_path / "sweep", trial_config, trial_cell, direction)
    md = _report(tmp_path / "sweep")
    pick = (max if direction == "maximize" else min)(range(len(COMPLETE)), key=lambda i: COMPLETE[i][1][0])
    number = _numbers()[pick]
    (thr, weight, subset), (val, test) = COMPLETE[pick]
    head, versus = _best_line(md)
    assert f"trial {number}, cell `{cells[number]}`" in head and f"`val/acc_best` {val:.4f}." in head
    assert f"`proxy.threshold={thr:.3g}`" in head and f"`proxy.weight={weight:.3g}`" in head
    assert f"`proxy.subset={subset:.3g}`" in head
    diff = test - BASELINE["test/acc"]
    assert f"`test/acc` {test:.4f} (n=1), its paired baseline (same seed) {BASELINE['test/acc']:.4f} (n=1): " \
           f"Δ {diff:+.4f}; no 95% interval: it needs this configuration trained with at least 2 seeds" in versus


def test_with_more_seeds_of_the_best_trial_its_delta_has_an_interval(search_sweep, trial_config, trial_cell):
    from scipy.stats import t as student_t

    sweep, _ = search_sweep
    (thr, weight, subset), (_, test) = COMPLETE[3]  # the best: val/acc_best 0.93
    proxy_tests, base_tests = {1: 0.89, 2: 0.86}, {1: 0.85, 2: 0.84}
    for seed in (1, 2):
        cfg = trial_config(thr, weight, subset)
        cfg.train.seed = seed
        trial_cell(sweep, cfg, {"val/acc_best": 0.9, "test/acc": proxy_tests[seed]})
        trial_cell(sweep, baseline_of(cfg), {"val/acc_best": 0.8, "test/acc": base_tests[seed]})
    diffs = [test - BASELINE["test/acc"], proxy_tests[1] - base_tests[1], proxy_tests[2] - base_tests[2]]
    mean = sum(diffs) / 3
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = student_t.ppf(0.975, 2) * std / math.sqrt(3)
    _, versus = _best_line(_report(sweep))
    assert f"Δ {mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}] (95% CI over 3 seeds, p = " in versus


def test_labels_name_every_searched_key_rounded_and_no_long_float_is_left(search_sweep):
    md = _report(search_sweep[0])
    configs = _table(_section(md, "## Every proxy configuration, paired with its baseline"))
    want = sorted(f"proxy.subset={s:.3g} proxy.threshold={t:.3g} proxy.weight={w:.3g}"
                  for (t, w, s), _ in COMPLETE)
    assert sorted(r[0] for r in configs) == want
    failed = _table(_section(md, "## Cells not done"))
    assert failed[0][1] == "FAILED" and failed[0][2] == "proxy.subset=0.577 proxy.threshold=0.314 proxy.weight=0.272"
    assert LONG_FLOAT.findall(md) == []


def test_by_tables_of_searched_keys_are_binned(search_sweep):
    md = _report(search_sweep[0])
    for key in KEYS:
        text = _section(md, f"## By {key.split('.')[-1]}")
        assert f"`{key}` was searched: its {len(COMPLETE)} values are grouped into" in text
        rows = _table(text)
        assert 2 <= len(rows) <= MAX_BY_ROWS
        assert all(re.fullmatch(r"\d\.\d{1,3}(–\d\.\d{1,3})?", r[2]) for r in rows), rows
        lows = [float(r[2].split("–")[0]) for r in rows]
        assert lows == sorted(lows)
        assert sum(int(re.search(r"\(n=(\d+)\)", r[3]).group(1)) for r in rows) == len(COMPLETE)


@pytest.mark.parametrize("minimize", [False, True])
def test_the_search_figure_rings_the_best_trial_in_the_studys_direction(tmp_path, monkeypatch, minimize):
    import matplotlib.pyplot as plt
    import pandas as pd

    from proxyattention.analysis import figures

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)  # keep the figure to read what was drawn
    df = pd.DataFrame({"state": ["DONE"] * 4 + ["FAILED"], "role": ["proxy"] * 4 + ["proxy"],
                       "proxy.threshold": [0.1, 0.4, 0.6, 0.85, 0.2],
                       "val/loss": [0.9, 0.3, 0.7, 0.5, 0.01]})
    assert figures.figure_search(df, ["proxy.threshold"], tmp_path / "s.png", "val/loss", minimize=minimize) \
        == ["proxy.threshold"]
    (ax,) = kept[0].axes
    points, ring = ax.collections  # every DONE trial, then the ring
    assert len(points.get_offsets()) == 4  # the FAILED trial is not drawn
    expected = [0.4, 0.3] if minimize else [0.1, 0.9]
    assert [float(v) for v in ring.get_offsets()[0]] == pytest.approx(expected)


def test_the_accuracy_table_says_the_search_picks_its_best_on_another_metric(search_sweep):
    section = _section(_report(search_sweep[0]), "## Test accuracy by dataset and model")
    assert "highest mean final validation accuracy" in section
    assert "The Search section's best trial is chosen on the study's objective instead (`val/acc_best`)" in section


def test_the_learning_curves_show_the_configurations_best_on_final_validation_accuracy(tmp_path, monkeypatch):
    """As the accuracy table's "best": the mean *final* val/acc, not the peak val/acc_best."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from proxyattention.analysis import figures

    kept = []
    monkeypatch.setattr(plt, "close", kept.append)
    n = figures.MAX_CURVES + 2
    rows = []
    for i in range(n):  # config i: peak 0.9 - i/100 (descending), final 0.5 + i/100 (ascending)
        history = [{"epoch": 1, "val/acc": 0.9 - i / 100}, {"epoch": 2, "val/acc": 0.5 + i / 100}]
        path = tmp_path / f"r{i}.json"
        path.write_text(json.dumps({"history": history}))
        rows.append({"cell_id": f"c{i}", "config_id": f"k{i}", "role": "proxy", "state": "DONE",
                     "dataset.name": "digits", "model.name": "m", "proxy.schedule": "1,p,1",
                     "val/acc": 0.5 + i / 100, "val/acc_best": 0.9 - i / 100, "result_path": str(path)})
    df = pd.DataFrame(rows)
    assert figures.figure_curves(df, [("digits", "m")], {}, tmp_path / "c.png") == [("digits", "m")]
    drawn = {line.get_label().split(" ")[0] for line in kept[0].axes[0].get_lines() if line.get_label()[0] == "k"}
    assert drawn == {f"k{i}" for i in range(n - figures.MAX_CURVES, n)}  # the highest final val/acc
