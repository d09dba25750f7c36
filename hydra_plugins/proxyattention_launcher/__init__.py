"""Hydra plugins of the sweep launcher (Hydra instantiates plugins only from ``hydra_plugins.*``).

Imported by Hydra's plugin scan at every start of any Hydra app, so it stays light: the classes are
thin subclasses of :mod:`launcher.plugin`; planning and running are imported when a sweep launches.

- ``LocalLauncher`` (``hydra/launcher=local``) runs cells as local subprocesses (launcher.local);
- ``SlurmLauncher`` hands them to ``launcher.slurm`` (its ``run(sweep_dir, records, launcher_cfg)``);
- ``CellSweeper`` (``hydra/sweeper=cells``) is Hydra's BasicSweeper without double composition;
- ``SavedSweeps`` puts the repository's ``sweeps/`` folder on the config search path, so a saved
  sweep ``sweeps/sweep/<name>.yaml`` runs as ``python -m launcher -m +sweep=<name>``.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from launcher import plugin as _plugin

_REPO = Path(__file__).resolve().parents[2]
_SWEEPS = _REPO / "sweeps"
_CONF = _REPO / "conf"


class LocalLauncher(_plugin.SweepLauncher):
    backend = "local"


class SlurmLauncher(_plugin.SweepLauncher):
    backend = "slurm"


class CellSweeper(_plugin.CellSweeper):
    pass


class SavedSweeps(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # Only for apps composing this repository's conf/ (the launcher and the trial entry point).
        ours = any(str(e.path).rstrip("/").endswith(str(_CONF)) for e in search_path.get_path())
        if ours and _SWEEPS.is_dir():
            search_path.append(provider="proxyattention-sweeps", path=f"file://{_SWEEPS}")


_plugin.register_configs()
_plugin.register_resolvers()
try:  # the Slurm backend's schema (hydra/launcher=slurm); light: submitit is imported on submit only
    from launcher import slurm as _slurm
except ImportError:
    _slurm = None
if _slurm is not None:
    _slurm.register_configs()
