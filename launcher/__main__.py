"""``python -m launcher [-m] key=a,b ...`` — run a sweep of the installed app's jobs (here: Proxy Attention
trials).

The command of an app that plugs into the launcher with a config folder of its own
(:attr:`launcher.apps.App.config_dir`, here ``conf/``, the one ``python -m proxyattention.train`` reads): a
Hydra app on that folder whose launcher plugin (``hydra/launcher=local`` by default) turns each job of the
grid into cells and runs the cells that are not DONE. Any other Hydra app needs no such command: it runs
its own ``-m`` sweeps with ``hydra/launcher=local``. It is always a sweep: ``-m`` is implied (``--run`` is
refused). Hydra's own flags work (``--cfg job``, ``-cjob``, ``--help``, ``--info``, ``--info searchpath``).
Only the launcher's own launchers (``hydra/launcher=local``, ``slurm``, ``slurm_v100``, or one of yours
targeting them) run cells.

Options (all ``hydra.launcher.*`` overrides, see conf/hydra/launcher/local.yaml):
``workers=N``, ``timeout_min=M``, ``rerun=not_done|failed|damaged|all``, ``dry_run=true``, ``gpus=0,1``
(``failed``: FAILED/TIMEOUT/CANCELLED/DAMAGED cells; ``damaged``: only DAMAGED ones, whose files move to
``damaged-<stamp>/`` first).
``hydra.sweep.dir=DIR`` chooses the sweep folder (default: ``outputs/sweeps/<overrides>-<hash>``).
Saved sweeps: ``python -m launcher +sweep=smoke`` (files in ``sweeps/sweep/``).

Exit code: 0 when every cell of the sweep is DONE, 1 otherwise, 130 when interrupted.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from launcher import apps
# Flags after which Hydra does not sweep (it prints, or runs one job): no --multirun is added for them.
_NO_SWEEP_FLAGS = ("--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc", "--info", "-i",
                   "--cfg", "-c", "--resolve")
# Hydra's flags that take a value (argparse reads overrides as one positional run, so an added override
# must join the others rather than follow a flag's value).
_VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun")  # --shell-completion is a switch
_INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
_SHORT3 = ("-cd", "-cn", "-cp", "-sc")  # short flags of two letters; any other short flag is one letter


def flag_name(arg: str) -> str:
    """The flag an argument spells: ``--cfg=job`` and ``-cjob`` are ``--cfg`` and ``-c``; "" if none."""
    if not arg.startswith("-") or arg == "-":
        return ""
    if arg.startswith("--"):
        return arg.split("=", 1)[0]
    return next((s for s in _SHORT3 if arg.startswith(s)), arg[:2])


def with_override(argv: list[str], override: str) -> list[str]:
    """``argv`` with ``override`` placed among the other overrides, whatever flags surround them."""
    flags, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = flag_name(arg)
        if name:
            flags.append(arg)
            inline = arg != name  # --cfg=job, -cjob
            takes_value = name in _VALUE_FLAGS or (name in ("--info", "-i") and i + 1 < len(argv)
                                                   and argv[i + 1] in _INFO_CHOICES)
            if takes_value and not inline and i + 1 < len(argv):
                flags.append(argv[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return overrides + [override] + flags  # overrides first: an optional flag value (--info) never eats one


def command_app() -> "apps.App":
    """The installed app ``python -m launcher`` runs: the first with a config folder of its own."""
    from launcher import apps

    for app in apps.installed():
        if app.config_dir() is not None:
            return app
    print("error: python -m launcher runs the sweeps of an installed app with a config folder of its own "
          f"(entry point group {apps.GROUP}), and none is installed: in a checkout updated since it was "
          "installed, install it again (pip install -e .); any Hydra app sweeps with `python my_app.py -m "
          "hydra/launcher=local key=a,b`", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    import hydra
    from omegaconf import DictConfig

    from launcher import plugin

    app_of = command_app()
    argv = app_of.command_argv(sys.argv[1:])
    names = {flag_name(a) for a in argv}
    if names & {"--run", "-r"}:
        print("error: python -m launcher always runs a sweep, each job a cell in its own process (drop "
              f"--run); {app_of.one_job_hint}", file=sys.stderr)
        sys.exit(2)
    app_of.register_configs()
    plugin.register_configs()
    plugin.register_resolvers()
    plugin.CELL_LAUNCHERS_ONLY = True
    plugin.FOREIGN_LAUNCHER_HINT = app_of.hydra_launchers_hint

    if not names & {"-m", "--multirun"} and not names & set(_NO_SWEEP_FLAGS):
        argv.insert(0, "--multirun")
    if not any(a.startswith("hydra.job.name=") for a in argv):
        argv = with_override(argv, "hydra.job.name=launcher")  # not "__main__" in --help and logs
    sys.argv[1:] = argv

    @hydra.main(config_path=str(app_of.config_dir()), config_name=app_of.config_name, version_base="1.3")
    def app(cfg: DictConfig) -> None:
        # Reached without --multirun (--cfg job), or when a launcher that is not this project's runs
        # the jobs in this process: a sweep never runs trials in-process.
        raise plugin.SweepError(plugin.foreign_launcher())

    try:
        app()
    except SystemExit as e:  # Hydra exits 1 when cells are not DONE; 130 (interrupted) is kept
        sys.exit(plugin.EXIT_CODE or e.code)
    sys.exit(plugin.EXIT_CODE)


if __name__ == "__main__":
    main()
