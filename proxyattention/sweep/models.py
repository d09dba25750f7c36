"""The models a sweep plans, without running it: ``python -m proxyattention.sweep.models OVERRIDES...``.

Prints ``[{"name": ..., "pretrained": ...}, ...]`` as JSON for the sweep ``python -m launcher OVERRIDES``
would plan: ``python -m proxyattention.data weights +sweep=NAME`` reads it to fetch the pretrained
weights of a sweep before its cells run where there is no internet. The jobs are expanded by the same
steps as the launcher's (:func:`sweep_jobs`); nothing is written, and no dataset needs to be on disk.
"""

from __future__ import annotations

import json
import re
from typing import Optional, Sequence

from proxyattention.sweep.plan import Compose, Composer
from omegaconf import OmegaConf

from proxyattention.config import GROUP_SCHEMAS


def sweep_jobs(argv: Sequence[str]) -> tuple[list[list[str]], Compose]:
    """The jobs ``python -m launcher ARGV`` would plan, and the function composing one job's config.

    The same steps as the launcher's: the main config with ARGV (saved sweeps, ``hydra.sweeper.params``,
    ``hydra.searchpath`` included), the sweep parameters ahead of the command line's overrides, Hydra's
    ``BasicSweeper`` splitting them into jobs (what :class:`launcher.plugin.CellSweeper` does).
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    import hydra_plugins.proxyattention_launcher  # noqa: F401  (the launcher schemas a profile names)
    from launcher import plugin
    from proxyattention.config import register_configs
    from proxyattention.paths import conf_dir
    from proxyattention.schedule import quote_schedule_overrides

    register_configs()
    plugin.register_configs()
    plugin.register_resolvers()
    overrides = quote_schedule_overrides(list(argv))
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(conf_dir())))
    master = loader.load_configuration("config", overrides=overrides, run_mode=RunMode.MULTIRUN)
    params = OmegaConf.select(master, "hydra.sweeper.params") or {}
    task = OmegaConf.to_container(master.hydra.overrides.task, resolve=False)
    parser = OverridesParser.create(config_loader=loader)
    parsed = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + list(task))  # type: ignore[arg-type]
    jobs = [list(j) for batch in BasicSweeper.split_arguments(parsed, None) for j in batch]
    return jobs, lambda job: loader.load_sweep_config(master, list(job))


def planned_models(argv: Sequence[str]) -> list[dict]:
    """``{"name", "pretrained"}`` of each distinct model the cells of ``python -m launcher ARGV`` use, in
    job order. Writes nothing, and needs no dataset on disk: each distinct combination of the overrides
    that can change ``model.*`` (all but another trial group's ``group=choice`` and plain
    ``group.key=value``) is composed once."""
    jobs, compose = sweep_jobs(argv)
    composer = Composer(compose)
    # Another trial group's choice (dataset=cifar100) cannot change model.*: no conf/ group file is global.
    other_group = re.compile(r"(?:%s)=" % "|".join(g for g in GROUP_SCHEMAS if g != "model"))
    seen: dict[tuple, dict] = {}
    composed: set[tuple[str, ...]] = set()
    for job in jobs:
        key = tuple(o for o in job if not other_group.match(o)
                    and ((kind := composer.classify(o)) is None or kind[0] == "model"))
        if key in composed:
            continue
        composed.add(key)
        cfg = compose(list(job))
        name, pretrained = str(OmegaConf.select(cfg, "model.name")), bool(OmegaConf.select(cfg, "model.pretrained"))
        seen.setdefault((name, pretrained), {"name": name, "pretrained": pretrained})
    return list(seen.values())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m proxyattention.sweep.models OVERRIDES...``: print :func:`planned_models` as JSON (exit 2: bad sweep)."""
    import sys

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        print(json.dumps(planned_models(args)))
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        print(f"error: {' '.join(args)}: {str(e).strip()}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
