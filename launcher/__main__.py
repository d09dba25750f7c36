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
from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
_NO_SWEEP_FLAGS = ("--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc", "--info", "-i",
                   "--cfg", "-c")


def quote_schedule_overrides(argv: list[str]) -> list[str]:
    """``proxy.schedule=20,p,19`` → ``proxy.schedule='20,p,19'``.

    Unquoted, Hydra would sweep over "20", "p" and "19". A value with a ``p`` step can only be one
    schedule; to sweep several schedules quote each: ``proxy.schedule="'5,p,4','20,p,19'"``.
    """
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        tokens = [t.strip().lower() for t in value.split(",")]
        if (eq and key.lstrip("+~") == "proxy.schedule" and "," in value and value[:1] not in "'\"["
                and "p" in tokens and "(" not in value):
            arg = f"{key}='{value}'"
        out.append(arg)
    return out


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
        argv.append("hydra.job.name=launcher")  # not "__main__" in --help and logs
    sys.argv[1:] = argv

    @hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
    def app(cfg: DictConfig) -> None:
        # Only reached without --multirun (e.g. `--cfg job`): a sweep never runs trials in-process.
        print("python -m launcher always runs a sweep; run one trial with python -m proxyattention.train",
              file=sys.stderr)

    app()
    sys.exit(plugin.EXIT_CODE)


if __name__ == "__main__":
    main()
