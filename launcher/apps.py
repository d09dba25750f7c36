"""Which app a sweep's jobs belong to, and what an app plugs into the launcher.

The launcher's core (plan files, the store, the manifest, the backends, status) runs *cells*: a folder
with the job's ``config.yaml``, run as ``python -m <cell module> CELL_DIR``, judged DONE by its
``result.json``. How a Hydra job becomes cells is the app's: an :class:`App`.

- Any Hydra app's jobs are its task function, each job one cell (:class:`App`, :mod:`launcher.taskcell`):
  nothing to install or declare.
- An app that wants more (its own cell runner, cells added to a job, checks before anything runs, its
  own summary column) names an :class:`App` subclass under the entry point group ``launcher.apps`` in
  its ``pyproject.toml``; the first installed app whose :meth:`App.accepts` takes the composed config
  launches the sweep. This project's Proxy Attention trials are such an app (its ``pyproject.toml``
  names ``proxyattention.sweep.app:TrialApp``).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)

GROUP = "launcher.apps"  # the entry point group an app registers its App under


class App:
    """What an app plugs into the launcher. This base is any Hydra app: each job runs the app's task function
    in a cell of its own (:func:`launcher.taskcell.launch`); a subclass registered under :data:`GROUP`
    launches its jobs its own way (:meth:`launch`)."""

    name = "task"
    roles: tuple[str, ...] = ("job",)  # the roles of the cells this app plans (CellRecord.role)
    summary_metrics: tuple[str, ...] = ("return_value",)  # metrics of result.json a cell's status keeps
    default_objective = "return_value"  # what a job returns to an adaptive sweeper when hydra.launcher.objective is null
    # The summary's and status's result column: (header, metric of result.json, format).
    column: tuple[str, str, str] = ("return", "return_value", "{:.6g}")
    # Its Slurm jobs read pretrained weights from the hub cache only (HF_HUB_OFFLINE=1, unless the submitting
    # environment set it: launcher.slurm.cells_hub_offline). False: they run in the submitting environment.
    hub_offline = False

    def accepts(self, config: Any) -> bool:
        """Whether this app launches the sweep of ``config`` (the composed config of the command)."""
        return True

    def launch(self, launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> tuple[list, int]:
        """Run one batch of jobs as cells: one ``JobReturn`` per job, and the exit code of the batch.
        Raises ``ValueError`` with a one-line message for a batch that cannot start."""
        raise NotImplementedError(f"the launcher app {self.name!r} does not launch jobs itself")

    # ``python -m launcher``: the app's own sweep command, for an app with a config folder of its own.
    config_name = "config"
    one_job_hint = ""  # how to run one job in-process instead, said when the command refuses --run
    hydra_launchers_hint = ""  # how to run the jobs with Hydra's own launchers, said when the command refuses one

    def config_dir(self) -> Optional[str]:
        """The app's primary config folder, for ``python -m launcher``; None: the app has no such command."""
        return None

    def command_argv(self, argv: list[str]) -> list[str]:
        """The command line as ``python -m launcher`` hands it to Hydra (an app may quote its own values)."""
        return list(argv)

    def register_configs(self) -> None:
        """Put the app's structured configs in Hydra's ConfigStore before ``python -m launcher`` composes."""

    def check_options(self, launcher_cfg: Any) -> None:
        """Refuse (``ValueError``, one line naming the key) ``hydra.launcher.*`` values this app cannot run
        with, before anything is planned or written (the backend has checked its own)."""

    def dry_run_estimate(self, sweep_dir: Any, cell_ids: Sequence[str], store: Any, gpu: Optional[str],
                         timeout_min: Optional[float] = None) -> Optional[str]:
        """Lines a dry run prints after its listing (e.g. the time the cells would take); None: nothing."""
        return None


@lru_cache(maxsize=1)
def installed() -> tuple[App, ...]:
    """The apps installed in this environment (entry point group ``launcher.apps``), by name."""
    from importlib.metadata import entry_points

    apps = []
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        try:
            cls = ep.load()
        except Exception as e:  # noqa: BLE001 (a broken app never stops another app's sweep)
            log.warning("launcher app %s (%s) cannot be loaded: %s", ep.name, ep.value, e)
            continue
        apps.append(cls() if isinstance(cls, type) else cls)
    return tuple(apps)


def for_config(config: Any) -> Optional[App]:
    """The installed app that launches the jobs of ``config`` (the first that accepts it), or None: the
    jobs are the app's task function (:func:`launcher.taskcell.launch`)."""
    for app in installed():
        if app.accepts(config):
            return app
    return None


def for_records(records: Sequence[Any]) -> App:
    """The app whose cells ``records`` are (by their roles), else :class:`App`."""
    roles = {r.role for r in records}
    for app in installed():
        if roles and roles <= set(app.roles):
            return app
    return App()


def summary_metrics() -> tuple[str, ...]:
    """The metrics a cell's ``status.json`` keeps from its result, over every installed app."""
    names = list(App.summary_metrics)
    for app in installed():
        names += [m for m in app.summary_metrics if m not in names]
    return tuple(names)
