"""A Hydra launcher with a store: every job a *cell* — its own folder, its own process — kept in a store
where a DONE cell is never run again.

Hydra's sweeper expands the grid; the launcher plugin (:mod:`launcher.plugin`) hands each batch to the
app whose jobs these are (:mod:`launcher.apps`): any Hydra app's task function by default
(:mod:`launcher.taskcell`), or an installed app that plans its own cells (this project's Proxy Attention
trials: :mod:`proxyattention.sweep`). The backends run the cells that are not DONE.

Modules:

- :mod:`launcher.apps` — what an app plugs in, and which app a sweep's jobs belong to;
- :mod:`launcher.taskcell` — any Hydra app's task function as a cell (``python -m launcher.taskcell``);
- :mod:`launcher.manifest` — the sweep folder: plans, claims, outcomes, reruns (the file protocol every
  backend shares); :mod:`launcher.cellstate` — cell states; :mod:`launcher.fileio` — atomic files;
- :mod:`launcher.local` — the local backend: a bounded pool of cell subprocesses
  (:mod:`launcher.cellproc`: one attempt of one cell);
- :mod:`launcher.slurm` — the Slurm backend: job arrays through submitit, submit and exit
  (:mod:`launcher.slurm_job` on the node, :mod:`launcher.slurm_state` from ``squeue``/``sacct``);
- :mod:`launcher.plugin` — the Hydra launcher and grid sweeper classes; :mod:`launcher.optuna_sweeper`
  and :mod:`launcher.optuna_worker` — an Optuna study whose trials are cells;
- :mod:`launcher.progress` — a running cell's progress and prune requests;
- :mod:`launcher.console`, :mod:`launcher.status` (``python -m launcher.status SWEEP_DIR [--json]``),
  :mod:`launcher.results` (``python -m launcher.results SWEEP_DIR``) — what a user sees.

Nothing here imports an app (tests/test_layout.py checks it) or torch: planning, status and rerun
decisions stay instant; ``import torch`` is paid inside cells only.
"""
