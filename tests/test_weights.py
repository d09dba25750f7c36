"""Pretrained weights on machines without internet: ``python -m proxyattention.data weights`` puts them in
the cache where timm's own offline load finds them, a trial loads cached weights without the hub, and a
sweep whose weights are neither cached nor fetchable is refused before any cell starts.

Every cache (HF_HOME, TORCH_HOME) is a temporary folder; nothing is downloaded. The weights files are
random tensors of timm's tiny ``test_resnet``, whose pretrained cfg names a hub repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.slurm import cells_hub_offline
from launcher.slurm_job import CellJob
from proxyattention import weights

MODEL = "test_resnet"
HUB_REPO = "models--timm--test_resnet.r160_in1k"


def random_state(seed: int = 7) -> dict[str, torch.Tensor]:
    """A full state dict of ``test_resnet`` whose float tensors are random: unlike any init of timm's."""
    import timm

    g = torch.Generator().manual_seed(seed)
    state = timm.create_model(MODEL).state_dict()
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone() for k, v in state.items()}


def write_weights(path: Path, state: dict[str, torch.Tensor], wrapped: bool = False) -> Path:
    if path.suffix == ".safetensors":
        import safetensors.torch

        safetensors.torch.save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 3} if wrapped else state, path)
    return path


@pytest.fixture
def caches(tmp_path, monkeypatch) -> dict[str, str]:
    """Empty weight caches and an offline hub, in this process and for the commands it runs."""
    env = {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_OFFLINE": "1"}
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE", "TIMM_USE_OLD_CACHE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def run(module: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env={**os.environ, **(env or {})},
                          text=True, capture_output=True, timeout=600)


OFFLINE_LOAD = r"""
import json, sys, timm, torch, safetensors.torch
from huggingface_hub import constants
assert constants.HF_HUB_OFFLINE
model = timm.create_model(sys.argv[1], pretrained=True)
if sys.argv[2].endswith(".safetensors"):
    want = safetensors.torch.load_file(sys.argv[2])
else:
    want = torch.load(sys.argv[2], weights_only=True)
    want = want.get("state_dict", want)
have = model.state_dict()
print(json.dumps({"keys": sorted(want) == sorted(have),
                  "equal": all(torch.equal(have[k], v) for k, v in want.items())}))
"""


# --- the cache layout and the command ---------------------------------------------------------------

@pytest.mark.parametrize("filename, wrapped, cached_as", [
    ("w.safetensors", False, "model.safetensors"),
    ("ckpt.pth", True, "pytorch_model.bin"),  # a training checkpoint: the state dict under "state_dict"
])
def test_from_file_seeds_the_cache_and_offline_timm_loads_exactly_those_tensors(caches, tmp_path, filename,
                                                                                  wrapped, cached_as):
    src = write_weights(tmp_path / filename, random_state(), wrapped=wrapped)
    proc = run("proxyattention.data", "weights", "--from-file", f"{MODEL}={src}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{MODEL}: cached from {src}" in proc.stdout

    repo = Path(caches["HF_HOME"]) / "hub" / HUB_REPO
    commit = (repo / "refs" / "main").read_text()  # what the hub reads: a commit name, no newline
    assert len(commit) == 40 and "\n" not in commit
    assert sorted(p.name for p in (repo / "snapshots" / commit).iterdir()) == [cached_as]
    # timm's own load, offline, reads the cache the command filled: the very tensors of the file.
    load = subprocess.run([sys.executable, "-c", OFFLINE_LOAD, MODEL, str(src)], cwd=tmp_path,
                          env={**os.environ}, text=True, capture_output=True, timeout=600)
    assert load.returncode == 0, load.stderr
    assert json.loads(load.stdout.splitlines()[-1]) == {"keys": True, "equal": True}


def test_without_the_command_offline_timm_finds_nothing(caches, tmp_path):
    """The check above could fail: the same offline load with an empty cache raises."""
    src = write_weights(tmp_path / "w.safetensors", random_state())
    load = subprocess.run([sys.executable, "-c", OFFLINE_LOAD, MODEL, str(src)], cwd=tmp_path,
                          env={**os.environ}, text=True, capture_output=True, timeout=600)
    assert load.returncode != 0


def test_a_file_that_does_not_fit_the_model_leaves_the_cache_unchanged(caches, tmp_path):
    state = random_state()
    state.pop("fc.weight")
    src = write_weights(tmp_path / "w.safetensors", state)
    with pytest.raises(weights.WeightsError, match="does not load into timm's test_resnet.*unchanged"):
        weights.seed_from_file(MODEL, src)
    hub = Path(caches["HF_HOME"]) / "hub"
    assert not hub.exists() or not any(p.is_file() for p in hub.rglob("*"))
    assert weights.cached_path(weights.locate(MODEL)) is None


def test_cached_path_follows_the_hub_layout(tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf")}
    loc = {"name": "m", "hub_id": "org/m.tag", "hub_filename": None, "url": None, "file": None}
    repo = tmp_path / "hf" / "hub" / "models--org--m.tag"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "pytorch_model.bin").write_bytes(b"x")
    assert weights.cached_path(loc, env) is None  # no refs/main: the hub names no snapshot
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert weights.cached_path(loc, env) == snap / "pytorch_model.bin"
    (snap / "model.safetensors").write_bytes(b"x")
    assert weights.cached_path(loc, env) == snap / "model.safetensors"  # timm's first choice
    pinned = {**loc, "hub_id": f"org/m.tag@{'b' * 40}"}
    assert weights.cached_path(pinned, env) is None  # a pinned revision reads only its own snapshot
    env["HF_HUB_CACHE"] = str(tmp_path / "elsewhere")
    assert weights.cached_path(loc, env) is None
    url = {**loc, "hub_id": None, "url": "https://example.org/w/resnet-abc123.pth"}
    ckpt = tmp_path / "th" / "hub" / "checkpoints" / "resnet-abc123.pth"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    assert weights.cached_path(url, {"TORCH_HOME": str(tmp_path / "th")}) == ckpt


@pytest.mark.parametrize("value, offline", [(None, False), ("1", True), ("true", True), ("YES", True),
                                            ("0", False), ("", False)])
def test_hub_offline_reads_the_variable_as_the_hub_does(value, offline):
    env = {} if value is None else {"HF_HUB_OFFLINE": value}
    assert weights.hub_offline(env) is offline


def test_a_trial_loads_cached_weights_without_the_hub(caches, tmp_path):
    """build_model reads the cached file itself (the hub's own settings are never consulted)."""
    from types import SimpleNamespace

    from proxyattention.models import build_model

    state = random_state(seed=3)
    src = write_weights(tmp_path / "w.safetensors", state)
    weights.seed_from_file(MODEL, src)
    model = build_model(SimpleNamespace(name=MODEL, pretrained=True, weights=None), num_classes=5, image_size=32)
    have = model.state_dict()
    body = [k for k in state if not k.startswith("fc.")]
    assert body and all(torch.equal(have[k], state[k]) for k in body)
    assert have["fc.weight"].shape[0] == 5  # a new head for the trial's classes


def test_the_command_expands_a_sweep_like_the_launcher(caches, tmp_path):
    src = write_weights(tmp_path / "w.safetensors", random_state())
    assert run("proxyattention.data", "weights", "--from-file", f"{MODEL}={src}", cwd=tmp_path).returncode == 0
    proc = run("proxyattention.data", "weights", "--check", f"model={MODEL},resnet18", "model.pretrained=true",
               "proxy.threshold=0.1,0.4", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{MODEL}: cached: " in proc.stdout and "resnet18: error: not cached" in proc.stdout
    thesis = run("proxyattention.sweep.models", "+sweep=thesis_weights", cwd=tmp_path)  # needs no dataset on disk
    assert thesis.returncode == 0, thesis.stderr
    assert json.loads(thesis.stdout) == [{"name": "efficientnet_b0", "pretrained": True},
                                         {"name": "resnet18", "pretrained": True}]


# --- the plan-time check -----------------------------------------------------------------------------

def test_offline_without_cached_weights_the_sweep_is_refused_before_any_cell(caches, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run("launcher", "-m", "model=resnet18", "model.pretrained=true", "proxy.threshold=0.4",
               f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "HYDRA_FULL_ERROR" not in ln]
    assert len(lines) == 1, proc.stderr
    assert "resnet18" in lines[0] and "python -m proxyattention.data weights resnet18" in lines[0]
    assert not sweep.exists()
    assert not any(Path(os.environ["PROXYATTENTION_STORE"]).iterdir())


def test_with_the_weights_cached_the_offline_plan_passes(caches, tmp_path):
    sweep = tmp_path / "sweep"
    args = ("-m", f"model={MODEL}", "model.pretrained=true", "proxy.threshold=0.4", "hydra.launcher.dry_run=true",
            f"hydra.sweep.dir={sweep}")
    refused = run("launcher", *args, cwd=tmp_path)
    assert refused.returncode != 0 and MODEL in refused.stderr
    src = write_weights(tmp_path / "w.safetensors", random_state())
    assert run("proxyattention.data", "weights", "--from-file", f"{MODEL}={src}", cwd=tmp_path).returncode == 0
    passed = run("launcher", *args, cwd=tmp_path)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "dry run: 2 of 2 cells would run" in passed.stdout


def test_online_weights_not_yet_cached_pass_the_plan(caches, tmp_path):
    """Not offline: the first cell downloads them; the check itself makes no network call."""
    sweep = tmp_path / "sweep"
    proc = run("launcher", "-m", f"model={MODEL}", "model.pretrained=true", "hydra.launcher.dry_run=true",
               f"hydra.sweep.dir={sweep}", cwd=tmp_path, env={"HF_HUB_OFFLINE": "0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="the Slurm backend refuses first without sbatch on PATH")
def test_a_slurm_sweep_needs_cached_weights_even_from_an_online_login_node(caches, tmp_path, monkeypatch):
    """Slurm cells run with the hub offline, so an online login node does not make uncached weights pass."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    sweep = tmp_path / "sweep"
    proc = run("launcher", "-m", f"model={MODEL}", "model.pretrained=true", "hydra/launcher=slurm",
               "hydra.launcher.dry_run=true", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and MODEL in proc.stderr and "weights" in proc.stderr, proc.stderr
    assert not sweep.exists()


# --- Slurm cells run offline ---------------------------------------------------------------------------

@pytest.mark.parametrize("env, offline", [({}, True), ({"HF_HUB_OFFLINE": "1"}, True),
                                          ({"HF_HUB_OFFLINE": "0"}, False)])
def test_slurm_cells_run_offline_unless_the_submitter_says_otherwise(env, offline):
    assert cells_hub_offline(env) is offline


ENV_CELL = r"""
import json, os, sys
cell = sys.argv[1]
open(os.path.join(cell, "hub_offline.txt"), "w").write(os.environ.get("HF_HUB_OFFLINE", "unset"))
json.dump({"status": "done", "metrics": {"test/acc": 0.5}, "timing": {"train_s": 0.1, "total_s": 0.1}},
          open(os.path.join(cell, "result.json"), "w"))
"""


@pytest.mark.parametrize("hub_offline, seen", [(True, "1"), (False, "unset")])
def test_a_slurm_job_starts_its_cell_with_the_hub_offline(tmp_path, monkeypatch, hub_offline, seen):
    (tmp_path / "envcell.py").write_text(ENV_CELL)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cell = tmp_path / "cell"
    cell.mkdir()
    out = CellJob(cell_dir=str(cell), cell_module="envcell", heartbeat_s=0.2, hub_offline=hub_offline)()
    assert out["state"] == "DONE"
    assert (cell / "hub_offline.txt").read_text() == seen
