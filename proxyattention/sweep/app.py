"""This project's Proxy Attention trials as an app of the launcher (:mod:`launcher.apps`).

The launcher runs any Hydra app's task function as cells; this app gives a sweep of trials what a bare
task function has not (registered in ``pyproject.toml`` under the entry point group ``launcher.apps``):

- **planning** (:mod:`proxyattention.sweep.plan`): every job composed and validated before any cell
  starts, a *paired baseline* added for every proxy cell (same config, no proxy steps, shared by every
  proxy cell that pairs with it), cell ids from the trial's canonical config
  (:mod:`proxyattention.identity`), the data checked, the cell folders and ``config.yaml`` snapshots
  written, the plan cached by the config files' fingerprint;
- **the model check** (:func:`proxyattention.sweep.plan.check_models`): every model builds, its CAM layer
  gives a real map, its pretrained weights are in the cache when the cells run offline;
- **the trial cell** ``python -m proxyattention.cell CELL_DIR`` (``hydra.launcher.cell_module``);
- **what a job returns** (:func:`proxyattention.sweep.launch.job_returns`): the cell's objective metric, or its gain over the paired
  baseline (``hydra.launcher.objective``, ``objective_vs_baseline``), for adaptive sweepers;
- **the summary column** ``test/acc`` and the dry run's time estimate (:mod:`proxyattention.sweep.estimate`).

Hydra's job callbacks fire for each cell the local backend runs
(:class:`proxyattention.sweep.launch.JobCallbacks`). Light to import: the launch is imported when it runs.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from launcher.apps import App
from proxyattention.sweep import DEFAULT_OBJECTIVE


class TrialApp(App):
    """A sweep of Proxy Attention trials: composed configs with every trial group."""

    name = "proxyattention"
    roles = ("proxy", "baseline")
    column = ("test/acc", "test/acc", "{:.4f}")
    summary_metrics = ("test/acc", "val/acc_best", "proxy/images")
    default_objective = DEFAULT_OBJECTIVE
    hub_offline = True  # a trial's pretrained weights come from the cache on compute nodes (docs/cluster.md)

    one_job_hint = "to run one trial in this process: python -m proxyattention.train KEY=VALUE ..."
    hydra_launchers_hint = ("to run trials with one of Hydra's own launchers use python -m proxyattention.train -m "
                            "hydra/launcher=NAME ...")

    def config_dir(self) -> Optional[str]:
        from proxyattention.paths import conf_dir

        return str(conf_dir())

    def command_argv(self, argv: list[str]) -> list[str]:
        from proxyattention.schedule import quote_schedule_overrides

        return quote_schedule_overrides(argv)

    def register_configs(self) -> None:
        from proxyattention.config import register_configs

        register_configs()

    def accepts(self, config: Any) -> bool:
        from proxyattention.config import GROUP_SCHEMAS

        return all(g in config for g in GROUP_SCHEMAS)

    def check_options(self, launcher_cfg: Any) -> None:
        check_objective(launcher_cfg.get("objective"))

    def dry_run_estimate(self, sweep_dir: Any, cell_ids: Sequence[str], store: Any, gpu: Optional[str],
                         timeout_min: Optional[float] = None) -> Optional[str]:
        from proxyattention.sweep.estimate import dry_run_estimate

        return dry_run_estimate(sweep_dir, cell_ids, store, gpu, timeout_min)

    def launch(self, launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> tuple[list, int]:
        """Plan the batch (validated, baselines added), write its cells, run them with the backend."""
        from proxyattention.sweep.launch import launch_trials

        return launch_trials(self, launcher, job_overrides, initial_job_idx)


# What a search may select on: validation metrics (val/…, val/explain/… on seeded validation images) and,
# as a second objective, training-side numbers (train/…, proxy/… such as proxy/images, a cost).
OBJECTIVE_PREFIXES = ("val/", "train/", "proxy/")


def check_objective(spec: Any) -> None:
    """Raise ``ValueError`` naming ``hydra.launcher.objective`` if a name is not a metric a search may select
    on: a sweeper selecting on the test split (``test/…``, and ``explain/…``, computed on test images) would
    report a test score it has tuned to."""
    from launcher import objective

    objective.check_objective(spec)
    for name in objective.names(spec, TrialApp.default_objective):
        if not name.startswith(OBJECTIVE_PREFIXES):
            raise ValueError(f"hydra.launcher.objective={name!r} must be a validation metric such as "
                             f"{TrialApp.default_objective} (or a training-side one: train/…, proxy/…); a sweeper "
                             "selecting on the test split (test/…, explain/… on test images) would report a tuned "
                             "test score")
