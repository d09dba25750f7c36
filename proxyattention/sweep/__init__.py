"""This project's trials as an app of the launcher: planning with paired baselines, the model check,
the dry run's estimate and ``python -m proxyattention.sweep.models`` (:mod:`proxyattention.sweep.app`)."""

# What a trial's job returns to an adaptive sweeper when hydra.launcher.objective is null.
DEFAULT_OBJECTIVE = "val/acc_best"
