"""Hydra plugins of the sweep launcher (Hydra instantiates plugins only from ``hydra_plugins.*``).

Imported by Hydra's plugin scan at every start of any Hydra app, so it stays light: the classes are
thin subclasses of :mod:`launcher.plugin`; planning and running are imported when a sweep launches.

- ``LocalLauncher`` (``hydra/launcher=local``) runs cells as local subprocesses (launcher.local); the
  jobs of an app that is not this project's trial run its own task function (launcher.taskcell);
- ``SlurmLauncher`` hands them to ``launcher.slurm`` (its ``run(sweep_dir, records, launcher_cfg)``);
- ``CellSweeper`` (``hydra/sweeper=cells``) is Hydra's BasicSweeper without double composition;
- ``OptunaSweeper`` (``hydra/sweeper=optuna``) runs an Optuna study whose trials are cells
  (launcher.optuna_sweeper; Optuna itself is imported when a study starts);
- ``SavedSweeps`` puts the saved sweeps (the repository's ``sweeps/``, or their installed copy) on the
  config search path, so a saved sweep ``sweeps/sweep/<name>.yaml`` runs as ``python -m launcher -m
  +sweep=<name>``;
- ``LauncherOptions`` makes ``hydra/launcher=local``, ``slurm`` and ``slurm_v100`` (``conf/hydra/launcher/``)
  resolve from any other Hydra app of the environment.
"""

from __future__ import annotations

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from launcher import optuna_sweeper as _optuna
from launcher import plugin as _plugin
from proxyattention import paths


class LocalLauncher(_plugin.SweepLauncher):
    backend = "local"


class SlurmLauncher(_plugin.SweepLauncher):
    backend = "slurm"


class CellSweeper(_plugin.CellSweeper):
    pass


class OptunaSweeper(_optuna.OptunaSweeper):
    pass


class SavedSweeps(SearchPathPlugin):
    """Appends the saved sweeps (:func:`proxyattention.paths.sweeps_dir`) to the search path of the
    apps composing this project's config folder (a clone's ``conf/`` or the installed copy)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        try:  # runs in every Hydra app of the environment: never fail one that is not ours
            conf, sweeps = str(paths.conf_dir()), paths.sweeps_dir()
        except FileNotFoundError:
            return
        ours = any(str(e.path).rstrip("/").endswith(conf) for e in search_path.get_path())
        if ours:
            search_path.append(provider="proxyattention-sweeps", path=f"file://{sweeps}")


def _ours(search_path: ConfigSearchPath) -> bool:
    """Whether the app composes this project's config folder (a clone's ``conf/`` or the installed copy)."""
    try:
        conf = str(paths.conf_dir())
    except FileNotFoundError:
        return False
    return any(str(e.path).rstrip("/").endswith(conf) for e in search_path.get_path())


class LauncherOptions(SearchPathPlugin):
    """``hydra/launcher=local``, ``slurm`` and ``slurm_v100`` for every other Hydra app of the environment.

    The options are this project's ``conf/hydra/launcher/*.yaml`` (a clone's, or the installed copy), the
    one source of their defaults: this project's apps read them from ``conf/``; for any other app they
    are put in Hydra's ConfigStore as they are, when its search path is made (never for this project's
    apps, where a file and a ConfigStore entry of the same name would clash)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        register_launcher_options(not _ours(search_path))


def register_launcher_options(register: bool = True) -> None:
    """Store (``register``) or remove the launcher options of ``conf/hydra/launcher/`` in the ConfigStore."""
    import yaml
    from hydra.core.config_store import ConfigStore

    try:
        files = sorted((paths.conf_dir() / "hydra" / "launcher").glob("*.yaml"))
    except FileNotFoundError:
        return
    cs = ConfigStore.instance()
    group = cs.repo.get("hydra", {}).get("launcher", {})
    for f in files:
        if not register:
            group.pop(f.name, None)
            continue
        if f.name in group:
            continue
        try:
            node = yaml.safe_load(f.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(node, dict):
            cs.store(group="hydra/launcher", name=f.stem, node=node, provider="proxyattention")


_plugin.register_configs()
_optuna.register_configs()  # hydra/sweeper=optuna, hydra/sweeper/sampler=…, hydra/sweeper/pruner=…
_plugin.register_resolvers()
try:  # the Slurm backend's schema (hydra/launcher=slurm); light: submitit is imported on submit only
    from launcher import slurm as _slurm
except ImportError:
    _slurm = None
if _slurm is not None:
    _slurm.register_configs()
