"""Any app's sweep as one table (:mod:`launcher.results`): a real sweep of tests/apps/counter_app.py read
back with its config keys flattened, its return values, a failed job's error, the CSV of
``python -m launcher.results``; the Proxy Attention table and report on such a sweep."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from launcher import cellstate, results
from launcher.cellstate import CellState, CellStatus, Owner

APP = Path(__file__).resolve().parent / "apps" / "counter_app.py"
ARGS = ("x=1,2,3", "scale=2.5", "+opt.lr=0.1", "+opt.sched.name=cos", "+tags=[a,b]")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real sweep of the counter app, its own store: x=1,2,3 with scale 2.5; the job x=2 raises."""
    root = tmp_path_factory.mktemp("any_app")
    (root / "counters").mkdir()
    env = {**os.environ, "COUNTER_DIR": str(root / "counters"), "PROXYATTENTION_STORE": str(root / "store"),
           "FAIL_AT": "2"}
    proc = subprocess.run([sys.executable, str(APP), "-m", "hydra/launcher=local",
                           f"hydra.sweep.dir={root / 'sweep'}", *ARGS],
                          cwd=root, env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode != 0 and "ValueError: x=2 is refused" in proc.stdout, proc.stdout + proc.stderr
    return root / "sweep"


@pytest.fixture
def copy(sweep: Path, tmp_path: Path) -> Path:
    """A copy of the sweep (store entries copied in place of their links) that a test may damage."""
    dest = tmp_path / "sweep"
    shutil.copytree(sweep, dest, symlinks=False)
    return dest


def _by_x(df: pd.DataFrame) -> dict[int, pd.Series]:
    return {int(r["x"]): r for _, r in df.iterrows()}


def _cell_of(sweep: Path, x: int) -> Path:
    df = results.load_cells(sweep)
    return Path(df.loc[df["x"] == x, "dir"].item())


def test_one_row_per_job_with_flat_config_and_return_value(sweep: Path) -> None:
    df = results.load_cells(sweep)
    assert list(df.columns) == ["cell_id", "state", "role", "x", "scale", "opt.lr", "opt.sched.name", "tags",
                                "return_value", "error", "overrides", "dir"]
    assert list(df["x"]) == [1, 2, 3]  # the jobs' order
    rows = _by_x(df)
    assert [rows[x]["state"] for x in (1, 2, 3)] == ["DONE", "FAILED", "DONE"]
    assert set(df["role"]) == {"job"}
    assert set(df["scale"]) == {2.5} and set(df["opt.lr"]) == {0.1} and set(df["opt.sched.name"]) == {"cos"}
    assert all(t == ["a", "b"] for t in df["tags"])  # a list stays one value
    assert df["return_value"].dtype == float
    assert rows[1]["return_value"] == 2.5 and rows[3]["return_value"] == 7.5  # x * scale, as the app returns
    assert rows[1]["error"] == "" and rows[3]["error"] == ""
    assert rows[1]["overrides"] == "x=1 scale=2.5 +opt.lr=0.1 +opt.sched.name=cos +tags=[a,b]"
    for r in rows.values():
        assert Path(r["dir"]) == sweep / "cells" / r["cell_id"] and (Path(r["dir"]) / "config.yaml").is_file()


def test_a_failed_job_is_failed_with_its_error_line(sweep: Path) -> None:
    failed = _by_x(results.load_cells(sweep))[2]
    assert failed["state"] == "FAILED"
    assert failed["error"] == "ValueError: x=2 is refused"
    assert math.isnan(failed["return_value"])


def test_only_the_cells_asked_for(sweep: Path) -> None:
    every = results.load_cells(sweep)
    one = results.load_cells(sweep, ids=[every["cell_id"][2]])
    assert list(one["cell_id"]) == [every["cell_id"][2]] and list(one["x"]) == [3]


def test_the_command_writes_the_table_as_csv(sweep: Path, tmp_path: Path, run_module) -> None:
    out = tmp_path / "table.csv"
    proc = run_module("launcher.results", str(sweep), "--csv", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    csv = pd.read_csv(out)
    assert list(csv.columns) == list(results.load_cells(sweep).columns)
    rows = {int(r.x): r for r in csv.itertuples()}
    assert (rows[1].state, rows[1].return_value, rows[1].tags) == ("DONE", 2.5, "['a', 'b']")
    assert (rows[3].state, rows[3].return_value, rows[3].scale) == ("DONE", 7.5, 2.5)
    assert rows[2].state == "FAILED" and rows[2].error == "ValueError: x=2 is refused"
    assert math.isnan(rows[2].return_value)
    # The printed table shows every row; --csv - writes the CSV to stdout instead.
    printed = proc.stdout.splitlines()
    assert len(printed) == 4 and printed[0].split()[:4] == ["cell_id", "state", "role", "x"]
    assert "ValueError: x=2 is refused" in printed[2]
    to_stdout = run_module("launcher.results", str(sweep), "--csv", "-", cwd=tmp_path)
    assert to_stdout.stdout == out.read_text()


def test_the_command_prints_json(sweep: Path, tmp_path: Path, run_module) -> None:
    proc = run_module("launcher.results", str(sweep), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {r["x"]: r for r in json.loads(proc.stdout)}
    assert rows[1]["return_value"] == 2.5 and rows[2]["return_value"] is None
    assert rows[1]["tags"] == ["a", "b"] and rows[1]["opt.sched.name"] == "cos"


def test_a_folder_without_cells_is_refused_in_one_line(tmp_path: Path, run_module) -> None:
    folder = tmp_path / "not_a_sweep"
    folder.mkdir()
    proc = run_module("launcher.results", str(folder), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and str(folder) in line and "cells/" in line
    with pytest.raises(results.SweepFolderError, match="has no cells/ folder"):
        results.load_cells(folder)


def test_damaged_and_missing_cells_are_rows_with_their_reason(copy: Path) -> None:
    (copy / "cells" / _cell_of(copy, 1).name / "status.json").write_text("{not json")
    result = _cell_of(copy, 3) / "result.json"
    result.write_text(result.read_text()[:20])  # truncated after the cell finished
    cell2 = _cell_of(copy, 2)
    shutil.rmtree(cell2)  # a planned cell whose folder is gone
    rows = {r["cell_id"]: r for _, r in results.load_cells(copy).iterrows()}
    by_x = {int(r["x"]): r for r in rows.values() if not pd.isna(r.get("x"))}
    assert by_x[1]["state"] == "DAMAGED" and "status.json is not valid JSON" in by_x[1]["error"]
    assert by_x[3]["state"] == "DAMAGED" and "result.json" in by_x[3]["error"]
    assert math.isnan(by_x[3]["return_value"])
    gone = rows[cell2.name]
    assert gone["state"] == "PENDING" and "missing" in gone["error"] and gone["role"] == "job"
    assert pd.isna(gone["x"]) and gone["overrides"].startswith("x=2 ")


def test_running_cells_as_the_status_command_sees_them(copy: Path) -> None:
    cell = _cell_of(copy, 2)
    me = Owner.this_process()
    cellstate.write_status(cell, CellStatus().started_by(me, pid=os.getpid()))
    assert _by_x(results.load_cells(copy))[2]["state"] == "RUNNING"
    gone = CellStatus().started_by(me, pid=os.getpid())
    gone.owner_pid, gone.owner_start, gone.pid = 2**22 + 12345, 1, None  # its launcher is gone
    cellstate.write_status(cell, gone)
    row = _by_x(results.load_cells(copy))[2]
    assert row["state"] == "CANCELLED" and row["error"].startswith("interrupted")


def _fake_cell(sweep: Path, cid: str, config: str, metrics: dict) -> None:
    """A DONE cell folder no plan names, as the launcher would leave it."""
    cell = sweep / "cells" / cid
    cell.mkdir(parents=True)
    (cell / "config.yaml").write_text(config)
    (cell / "result.json").write_text(json.dumps({"status": "done", "metrics": metrics}))
    cellstate.write_status(cell, CellStatus(state=CellState.DONE, attempts=1,
                                            result_size=cellstate.result_size(cell)))


def test_metrics_non_numeric_returns_and_name_clashes(tmp_path: Path) -> None:
    _fake_cell(tmp_path, "aaaaaaaaaaaa", "state: hot\nx: 1\n", {"val/acc": 0.5, "x": 3.0})
    _fake_cell(tmp_path, "bbbbbbbbbbbb", "x: 2\nempty: {}\n", {})  # returned None, a string, an object…
    (tmp_path / "cells" / "cccccccccccc").mkdir()
    (tmp_path / "cells" / "cccccccccccc" / "config.yaml").write_text("a: [unclosed\n")
    df = results.load_cells(tmp_path).set_index("cell_id")
    a, b, c = df.loc["aaaaaaaaaaaa"], df.loc["bbbbbbbbbbbb"], df.loc["cccccccccccc"]
    assert a["config.state"] == "hot" and a["state"] == "DONE" and a["role"] == "unknown"
    assert a["val/acc"] == 0.5 and a["metric.x"] == 3.0 and a["x"] == 1
    assert list(df.columns) == ["state", "role", "config.state", "x", "empty", "return_value", "val/acc",
                                "metric.x", "error", "overrides", "dir"]
    assert math.isnan(a["return_value"]) and math.isnan(b["return_value"]) and b["state"] == "DONE"
    assert b["empty"] == {} and math.isnan(b["val/acc"])
    assert c["state"] == "DAMAGED" and "config.yaml is not valid YAML" in c["error"]


def test_flatten() -> None:
    assert results.flatten({"a": {"b": {"c": 1}, "d": [1, {"e": 2}]}, "f": None, 3: "g"}) == \
        {"a.b.c": 1, "a.d": [1, {"e": 2}], "f": None, "3": "g"}


def test_the_core_reads_a_sweep_without_the_trial_code(sweep: Path, tmp_path: Path) -> None:
    code = ("import sys; from launcher.results import load_cells; load_cells(sys.argv[1]); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'proxyattention', 'torch', 'hydra'}))")
    proc = subprocess.run([sys.executable, "-c", code, str(sweep)], cwd=tmp_path, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------------
# The Proxy Attention table and report on another app's sweep


def test_the_trial_table_reads_another_apps_jobs(sweep: Path) -> None:
    from proxyattention.analysis.table import load_results, results_csv_frame

    df = load_results(sweep)
    core = results.load_cells(sweep)
    assert sorted(df["cell_id"]) == sorted(core["cell_id"])
    assert set(df["role"]) == {"job"} and df["config_id"].isna().all() and df["baseline_id"].isna().all()
    rows = _by_x(df)
    assert (rows[1]["return_value"], rows[3]["return_value"]) == (2.5, 7.5)
    assert rows[2]["state"] == "FAILED" and rows[2]["error"] == "ValueError: x=2 is refused"
    assert rows[1]["opt.sched.name"] == "cos" and rows[1]["problem"] == ""
    assert {"x", "opt.lr", "return_value"} <= set(results_csv_frame(df).columns)


def test_the_report_refuses_another_apps_sweep(sweep: Path, tmp_path: Path, run_module) -> None:
    proc = run_module("proxyattention.report", str(sweep), f"report.out={tmp_path / 'report'}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "Proxy Attention trials" in line and f"python -m launcher.results {sweep}" in line
    assert not (tmp_path / "report").exists()
