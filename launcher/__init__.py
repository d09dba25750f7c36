"""Sweeps of Proxy Attention trials: ``python -m launcher -m key=a,b ...``.

Hydra's sweeper expands the grid; the launcher plugin (:mod:`launcher.plugin`) turns each job into a
*cell* — one trial in its own folder and its own process — and runs the cells that are not DONE.

Modules:

- :mod:`launcher.manifest` — cell identity on disk, states, atomic status files, claims (the file
  protocol every backend shares);
- :mod:`launcher.plan` — compose and validate every job, add paired baselines, name the cells;
- :mod:`launcher.local` — the local backend: a bounded pool of cell subprocesses;
- :mod:`launcher.plugin` — the Hydra launcher and sweeper classes;
- :mod:`launcher.console` — what the terminal shows;
- :mod:`launcher.status` — ``python -m launcher.status SWEEP_DIR [--json]``.

Nothing here imports torch (or anything of ``proxyattention`` but its config and schedule modules):
planning, status and rerun decisions stay instant; ``import torch`` is paid inside cells only.
"""
