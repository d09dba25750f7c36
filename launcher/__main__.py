"""``python -m launcher [-m] key=a,b ...`` — run a sweep of Proxy Attention trials.

A Hydra app on the same ``conf/`` as ``python -m proxyattention.train``; its launcher plugin
(``hydra/launcher=local`` by default) turns each job of the grid into a cell and runs the cells that
are not DONE. It is always a sweep: ``-m`` is implied. Hydra's own flags work (``--cfg job``,
``--help``, ``--info``).

Options (all ``hydra.launcher.*`` overrides, see conf/hydra/launcher/local.yaml):
``workers=N``, ``timeout_min=M``, ``rerun=not_done|failed|all``, ``dry_run=true``, ``gpus=0,1``.
``hydra.sweep.dir=DIR`` chooses the sweep folder (default: ``outputs/sweeps/<overrides>-<hash>``).
Saved sweeps: ``python -m launcher +sweep=smoke`` (files in ``sweeps/sweep/``).

Exit code: 0 when every cell of the sweep is DONE, 1 otherwise, 130 when interrupted.
"""

from __future__ import annotations

import sys

from proxyattention.paths import conf_dir
from proxyattention.schedule import quote_schedule_overrides

CONF_DIR = str(conf_dir())
_NO_SWEEP_FLAGS = ("--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc", "--info", "-i",
                   "--cfg", "-c")


# Hydra's flags that take a value (argparse reads overrides as one positional run, so an added override
# must join the others rather than follow a flag's value).
_VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun")  # --shell-completion is a switch


def with_override(argv: list[str], override: str) -> list[str]:
    """``argv`` with ``override`` placed among the other overrides, whatever flags surround them."""
    flags, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            flags.append(arg)
            takes_value = arg in _VALUE_FLAGS or (arg in ("--info", "-i") and i + 1 < len(argv)
                                                  and argv[i + 1] in ("all", "config", "defaults",
                                                                      "defaults-tree", "plugins", "searchpath"))
            if takes_value and "=" not in arg and i + 1 < len(argv):
                flags.append(argv[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags + overrides + [override]


def main() -> None:
    import hydra
    from omegaconf import DictConfig

    from launcher import plugin
    from proxyattention.config import register_configs

    register_configs()
    plugin.register_configs()
    plugin.register_resolvers()

    argv = quote_schedule_overrides(sys.argv[1:])
    if not any(a in ("-m", "--multirun") for a in argv) and not any(a in _NO_SWEEP_FLAGS for a in argv):
        argv.insert(0, "--multirun")
    if not any(a.startswith("hydra.job.name=") for a in argv):
        argv = with_override(argv, "hydra.job.name=launcher")  # not "__main__" in --help and logs
    sys.argv[1:] = argv

    @hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
    def app(cfg: DictConfig) -> None:
        # Only reached without --multirun (e.g. `--cfg job`): a sweep never runs trials in-process.
        print("python -m launcher always runs a sweep; run one trial with python -m proxyattention.train",
              file=sys.stderr)

    try:
        app()
    except SystemExit as e:  # Hydra exits 1 when cells are not DONE; 130 (interrupted) is kept
        sys.exit(plugin.EXIT_CODE or e.code)
    sys.exit(plugin.EXIT_CODE)


if __name__ == "__main__":
    main()
