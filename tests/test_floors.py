"""The dependency floors: .ci/lowest.txt pins exactly pyproject's floors, and the APIs they stand for exist.

``bash .ci/lowest`` installs .ci/lowest.txt into a fresh venv and runs the tests marked ``floors`` (these
among them); the main suite runs the same tests with the newest allowed versions.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQ = re.compile(r"^([A-Za-z0-9_.-]+)\s*(.*)$")


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _release(version: str) -> tuple[int, ...]:
    parts = [int(p) for p in version.split(".")]
    while parts and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml with tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _floors(requirements: list[str]) -> dict[str, str]:
    """``{name: floor}`` of requirement strings; each must have one ``>=`` floor."""
    out = {}
    for req in requirements:
        name, spec = REQ.match(req.split(";")[0].strip()).groups()
        floor = re.findall(r">=\s*([0-9][0-9.]*)", spec)
        assert len(floor) == 1, f"{req!r}: a dependency needs one >= floor"
        out[_name(name)] = floor[0]
    return out


def _lowest() -> tuple[dict[str, str], list[str]]:
    """``({name: pinned version}, [other requirement lines])`` of .ci/lowest.txt."""
    pins, others = {}, []
    for line in (ROOT / ".ci" / "lowest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        m = re.match(r"^([A-Za-z0-9_.-]+)==([0-9][0-9.]*)$", line)
        if m:
            assert _name(m[1]) not in pins, f"{m[1]} is pinned twice"
            pins[_name(m[1])] = m[2]
        else:
            others.append(line)
    return pins, others


@pytest.mark.floors
def test_lowest_txt_pins_exactly_the_floors():
    project = _pyproject()["project"]
    floors = _floors(project["dependencies"])
    extras = {}
    for reqs in project["optional-dependencies"].values():
        extras.update(_floors(reqs))
    pins, others = _lowest()
    missing = sorted(set(floors) - set(pins))
    assert not missing, f".ci/lowest.txt does not pin {missing}"
    for name, pinned in pins.items():
        floor = floors.get(name, extras.get(name))
        assert floor is not None, f".ci/lowest.txt pins {name}, which is no dependency in pyproject.toml"
        assert _release(pinned) == _release(floor), f"{name}: .ci/lowest.txt pins {pinned}, the floor is {floor}"
    # Other lines only constrain packages that are not ours to pin (they cannot move a floor).
    for line in others:
        name = _name(REQ.match(line)[1])
        assert name not in floors and name not in extras, f".ci/lowest.txt: {line!r} is not `{name}==floor`"


# --- what each floor stands for (the comments next to the floors in pyproject.toml) ---------------

@pytest.mark.floors
def test_torch_apis():
    import torch
    import torch.nn.functional as F

    assert issubclass(torch.OutOfMemoryError, RuntimeError)  # caught by the batch-size search
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # on a machine without CUDA the scaler disables itself
        torch.amp.GradScaler("cuda")
    assert "weights_only" in inspect.signature(torch.load).parameters
    assert "fused" in inspect.signature(torch.optim.AdamW).parameters
    x = torch.arange(3 * 16 * 16, dtype=torch.uint8).reshape(1, 3, 16, 16)
    y = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    assert y.dtype == torch.uint8 and y.shape == (1, 3, 8, 8)  # the uint8 resize of data/bank.py


@pytest.mark.floors
def test_timm_apis():
    import timm

    for name in ("test_resnet", "test_efficientnet", "test_vit"):  # the models of conf/model/test_*.yaml
        assert timm.is_model(name), name
    assert timm.get_pretrained_cfg("test_vit", allow_unregistered=True).fixed_input_size


@pytest.mark.floors
def test_grad_cam_has_every_name_the_project_uses():
    """Every ``pgc.X`` and ``from pytorch_grad_cam... import X`` of the project resolves."""
    import importlib

    used = set()
    for path in [*(ROOT / "proxyattention").rglob("*.py"), *(ROOT / "bench").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "pgc":
                used.add(("pytorch_grad_cam", node.attr))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pytorch_grad_cam"):
                used.update((node.module, a.name) for a in node.names)
    assert ("pytorch_grad_cam", "SegEigenCAM") in used  # the newest of them
    missing = sorted(f"{mod}.{name}" for mod, name in used
                     if not hasattr(importlib.import_module(mod), name))
    assert not missing, missing


@pytest.mark.floors
def test_submitit_apis():
    from submitit import SlurmExecutor

    assert "python" in inspect.signature(SlurmExecutor).parameters  # the nodes' interpreter


@pytest.mark.floors
def test_optuna_apis(tmp_path):
    """What launcher.optuna_sweeper uses of Optuna 4.0: a journal file storage, ask/tell with a state and
    skip_if_finished, intermediate values and the pruner's verdict, a RUNNING trial taken up again by id."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import Trial, TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "optuna.journal")))
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize", load_if_exists=True,
                                pruner=optuna.pruners.ThresholdPruner(lower=0.5))
    trial = study.ask()
    trial.suggest_float("x", 0.1, 0.9, step=0.1)
    trial.set_user_attr("cell", "abc")
    trial.report(0.2, step=1)
    assert trial.should_prune()
    again = optuna.load_study(study_name="s", storage=storage)
    running = again.get_trials(deepcopy=False, states=(TrialState.RUNNING,))[0]
    assert running.user_attrs == {"cell": "abc"}
    again.tell(Trial(again, running._trial_id), state=TrialState.PRUNED)
    again.tell(running.number, state=TrialState.FAIL, skip_if_finished=True)  # already finished: ignored
    assert again.trials[0].state == TrialState.PRUNED and again.trials[0].value == 0.2


@pytest.mark.floors
def test_any_apps_task_function_pickled_by_value(tmp_path, monkeypatch):
    """A foreign Hydra app's sweep (tests/apps/counter_app.py) on the local backend: launcher.taskcell
    pickles the app's task function, defined in ``__main__``, by value with cloudpickle (2.0.0 misreads
    Python 3.11's bytecode and cannot), and each cell's process unpickles and runs it."""
    from launcher import taskcell

    (tmp_path / "counters").mkdir()
    monkeypatch.setenv("PROXYATTENTION_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("COUNTER_DIR", str(tmp_path / "counters"))
    sweep = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "apps" / "counter_app.py"), "-m",
                           "hydra/launcher=local", f"hydra.sweep.dir={sweep}", "x=1,2"],
                          cwd=tmp_path, env=dict(os.environ), text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cells = sorted((sweep / "cells").iterdir())
    assert sorted(taskcell._read_pickle(c / taskcell.JOB_RETURN).return_value for c in cells) == [2.0, 4.0]
    assert sorted(p.name for p in (tmp_path / "counters").iterdir()) == ["x=1", "x=2"]
