"""A trial's checkpoints: the epoch checkpoint, and the proxy state saved apart from it.

``checkpoint.pt`` (every epoch) holds what changes every epoch and nothing more: model, optimizer,
scheduler, AMP scaler, RNG states, the batch size the trial chose, its progress, and the *version* of
the proxy state it was written with. The proxy state changes only at proxy steps, so it is saved then,
as ``proxy_state.<version>.pt``; an epoch checkpoint stays the size of model + optimizer at any dataset
size. A resumed trial loads the proxy state its checkpoint names (the newest one can be a step ahead,
when the trial stopped between a proxy step and that epoch's checkpoint), so a resumed trial is exact.
Every file is written through :func:`launcher.fileio.atomic_file`; temp files of a killed writer
are cleared on load.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import torch

from launcher import fileio
from proxyattention import paths

_STATE_FILE = re.compile(r"^proxy_state\.(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that does not belong to this trial or misses a file; the message names it."""


def _save(obj: Any, path: Path) -> None:
    with fileio.atomic_file(path, "wb") as f:
        torch.save(obj, f)


def proxy_state_path(out: Path, version: int) -> Path:
    return out / f"proxy_state.{version}.pt"


def save_proxy_state(out: Path, state: dict[str, Any]) -> Path:
    """Write the proxy state after a step as ``proxy_state.<version>.pt`` (version 0 needs no file)."""
    path = proxy_state_path(out, int(state["version"]))
    _save(state, path)
    return path


def prune_proxy_states(out: Path, keep: int) -> None:
    """Remove proxy-state files other than version ``keep``: the epoch checkpoint no longer needs them."""
    for p in out.glob("proxy_state.*.pt"):
        m = _STATE_FILE.match(p.name)
        if m and int(m.group(1)) != keep:
            p.unlink(missing_ok=True)


def save(out: Path, ckpt: dict[str, Any]) -> None:
    """Write the epoch checkpoint, then drop proxy states it does not name."""
    _save(ckpt, out / paths.CHECKPOINT)
    prune_proxy_states(out, int(ckpt["proxy_version"]))


def load(out: Path, trial_id: str) -> Optional[dict[str, Any]]:
    """The epoch checkpoint of this trial (with its proxy state under ``"proxy_state"``), or None."""
    fileio.remove_stale_temps(out, paths.CHECKPOINT)
    fileio.remove_stale_temps(out, "proxy_state.*")
    path = out / paths.CHECKPOINT
    if not path.exists():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("trial_id") != trial_id:
        raise CheckpointError(f"{path} belongs to a different trial config (id {ckpt.get('trial_id')}, this "
                              f"one is {trial_id}); use another hydra.run.dir or move that folder away")
    version = int(ckpt.get("proxy_version", 0))
    ckpt["proxy_state"] = None
    if version:
        state_path = proxy_state_path(out, version)
        if not state_path.exists():
            raise CheckpointError(f"{path} needs {state_path.name}, which is missing; the proxies of this "
                                  "trial cannot be restored — move the trial folder away and start again")
        ckpt["proxy_state"] = torch.load(state_path, map_location="cpu", weights_only=True)
    return ckpt
