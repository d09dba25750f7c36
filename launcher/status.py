"""``python -m launcher.status SWEEP_DIR [--json]`` — the state of every cell of a sweep.

Reads the sweep definitions (``plans/*.json``) and each cell's ``status.json`` — never ``result.json``,
checkpoints or logs (a DONE cell's ``result.json`` is only stat'ed: its size must be the one recorded
when it finished) — so it answers in well under a second for 10,000 cells. A RUNNING cell whose
launcher is gone shows as CANCELLED (interrupted), or as RUNNING (orphaned) while its cell process still
runs on this host. A cell whose entry cannot be trusted shows as DAMAGED with the reason, a cell whose
folder is gone from the store as PENDING (missing); neither is an error of this command. Cells run
by another backend (``"backend": "slurm"`` in their status) are refreshed by that backend's
``launcher.<backend>.refresh_status(sweep_dir, {cell_id: CellStatus}) -> {cell_id: CellStatus}`` when it
defines one (sacct for Slurm).

A RUNNING cell's progress comes from its ``progress.json`` (one small file, written by the cell after
every epoch: :mod:`launcher.progress`): epoch k of N, its last validation accuracy and the time
left (mean epoch time × epochs left). A PRUNED cell (stopped early at a prune request) shows with when
and why.

``--json`` prints ``{"sweep_dir", "cells": [{"id", "state", "overrides", "attempts", "dir", "job_id",
"role", "baseline", "duration_s", "error", "interrupted", "metrics"}, …], "counts": {STATE: n}}``; a
RUNNING cell also has ``"progress": {"epoch", "epochs", "val/acc", "val/acc_best", "epoch_s", "eta_s",
"updated"}`` (null before its cell has written one). ``counts`` names PRUNED only when a cell is.

A sweep run by ``hydra/sweeper=optuna`` also shows its study (the sweep folder's ``study.json``, written
by :mod:`launcher.optuna_sweeper` after each batch): ``"study": {"name", "storage", "storage_kind"
("journal": a journal file, open it with ``JournalStorage(JournalFileBackend(storage))``; "rdb": a URL
``optuna.load_study`` takes as it is), "directions", "objective", "n_trials", "trials", "complete",
"pruned", "failed", "running", "best_value", "best_params", "best_trial", "best_cell", …}``; a study run by
Slurm worker jobs (:mod:`launcher.optuna_worker`, refreshed by every worker after each trial) also has
``"workers": {"jobs", "live"}`` (the worker job ids, and those Slurm still has queued or running).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

from launcher import apps, cellstate, manifest, progress
from launcher.cellstate import CellState, CellStatus
from launcher.manifest import CellRecord


def collect(sweep_dir: Path, stale_after_s: float = cellstate.DEFAULT_STALE_AFTER_S
            ) -> tuple[list[CellRecord], dict[str, CellStatus]]:
    """The sweep's cells and their effective statuses."""
    records = manifest.read_plans(sweep_dir)
    root = str(cellstate.cells_root(sweep_dir))
    statuses = {}
    for r in records:
        cell = os.path.join(root, r.id)
        statuses[r.id] = cellstate.effective_status(cellstate.read_status(cell), stale_after_s, cell=cell)
    by_backend: dict[str, dict[str, CellStatus]] = {}
    for cid, s in statuses.items():
        if not s.state.finished and s.backend not in (None, "local"):
            by_backend.setdefault(s.backend, {})[cid] = s
    for backend, group in by_backend.items():
        try:
            mod = importlib.import_module(f"launcher.{backend}")
        except ImportError:
            continue
        refresh = getattr(mod, "refresh_status", None)
        if refresh is not None:
            statuses.update(refresh(Path(sweep_dir), group))
    return records, statuses


def counts_of(statuses: dict[str, CellStatus]) -> dict[str, int]:
    counts = {s.value: 0 for s in CellState if s != CellState.PRUNED}  # PRUNED only when there is one
    for s in statuses.values():
        counts[s.state.value] = counts.get(s.state.value, 0) + 1
    return counts


def running_progress(sweep_dir: Path, records: list[CellRecord], statuses: dict[str, CellStatus]
                     ) -> dict[str, Optional[dict]]:
    """The ``progress.json`` of every RUNNING cell (None where it has none yet, or it cannot be read)."""
    root = str(cellstate.cells_root(sweep_dir))
    return {r.id: progress.read_progress(os.path.join(root, r.id)) for r in records
            if statuses[r.id].state == CellState.RUNNING}


def as_json(sweep_dir: Path, records: list[CellRecord], statuses: dict[str, CellStatus]) -> dict:
    root = str(cellstate.cells_root(sweep_dir))
    running = running_progress(sweep_dir, records, statuses)
    cells = []
    for r in records:
        s = statuses[r.id]
        cells.append({"id": r.id, "state": s.state.value, "overrides": r.overrides, "attempts": s.attempts,
                      "dir": os.path.join(root, r.id), "role": r.role, "baseline": r.baseline,
                      "duration_s": s.duration_s, "error": s.error, "interrupted": s.interrupted,
                      "metrics": s.metrics, "job_id": s.job_id})
        if r.id in running:
            cells[-1]["progress"] = progress.summary(running[r.id])
    out = {"sweep_dir": str(sweep_dir), "cells": cells, "counts": counts_of(statuses)}
    study = _study(sweep_dir)
    if study is not None:
        out["study"] = study
    return out


def _study(sweep_dir: Path) -> Optional[dict]:
    """An Optuna sweep's ``study.json`` (launcher.optuna_sweeper, imported only for such a folder)."""
    if not (Path(sweep_dir) / "study.json").is_file():
        return None
    from launcher.optuna_sweeper import read_study

    study = read_study(sweep_dir)
    if study is not None:
        from launcher.optuna_worker import worker_summary

        workers = worker_summary(Path(sweep_dir))  # a study on Slurm: its worker jobs, asked of Slurm
        if workers is not None:
            study["workers"] = workers
    return study


def as_text(sweep_dir: Path, records: list[CellRecord], statuses: dict[str, CellStatus],
            error_lines: int = 6) -> str:
    from launcher.console import (
        distinguishing,
        fmt_duration,
        fmt_result,
        table,
    )

    labels = distinguishing(records)
    running = {cid: progress.describe(p) for cid, p in running_progress(sweep_dir, records, statuses).items()}
    shown = any(running.values())  # the progress column, only while a running cell has written its progress
    rows, tails, pruned = [], [], []
    column = apps.for_records(records).column
    for r in records:
        s = statuses[r.id]
        label = labels.get(r.id, "") or "-"
        if r.role == "baseline":
            label = f"[baseline] {label}"
        note = (" (interrupted)" if s.interrupted else
                " (orphaned)" if s.state == CellState.RUNNING and (s.error or "").startswith(cellstate.ORPHANED) else
                " (missing)" if s.state == CellState.PENDING and s.error else "")
        state = s.state.value + note + (f" job {s.job_id}" if s.job_id else "")
        rows.append([r.id, state, str(s.attempts), fmt_duration(s.duration_s), fmt_result(s, column)]
                    + ([running.get(r.id) or "-"] if shown else []) + [label])
        if s.state == CellState.PRUNED:
            pruned.append(f"{r.id}  {cellstate.error_headline(s.error) or 'pruned'}")
        elif s.error and s.state != CellState.DONE:
            lines = s.error.strip().splitlines()[-error_lines:]
            tails.append(f"{r.id} {s.state.value}:\n" + "\n".join("    " + ln for ln in lines))
    text = table(rows, ["cell", "state", "attempts", "time", column[0]] + (["progress"] if shown else [])
                 + ["overrides"])
    counts = ", ".join(f"{n} {st}" for st, n in counts_of(statuses).items() if n)
    out = [text]
    if tails:
        out.append("errors (tail):\n" + "\n".join(tails))
    if pruned:
        out.append("pruned (stopped early on request; partial results, not rerun):\n"
                   + "\n".join("    " + ln for ln in pruned))
    out.append(f"{len(records)} cells: {counts or 'none'}\nsweep folder: {sweep_dir}")
    study = _study(sweep_dir)
    if study is not None:
        from launcher.optuna_sweeper import closing_line

        out.append(closing_line(study))
        workers = study.get("workers")
        if workers:
            live = workers["live"]
            out.append(f"worker jobs: {len(workers['jobs'])} submitted, {len(live)} queued or running"
                       + (f" ({', '.join(live)})" if live else ""))
    return "\n\n".join(out)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launcher.status",
                                 description="Show the state of every cell of a sweep folder.")
    ap.add_argument("sweep_dir", type=Path, help="the sweep folder (printed at the end of every launch)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--stale-after", type=float, default=cellstate.DEFAULT_STALE_AFTER_S, metavar="S",
                    help="a RUNNING cell on another host silent for S seconds counts as interrupted")
    args = ap.parse_args(argv)
    if (not (args.sweep_dir / manifest.PLANS).is_dir() and not cellstate.cells_root(args.sweep_dir).is_dir()
            and not (args.sweep_dir / "study.json").is_file()):  # a study whose workers have not started yet
        print(f"error: {args.sweep_dir} is not a sweep folder (it has no plans/ or cells/); the launcher "
              "prints the sweep folder at the end of every launch", file=sys.stderr)
        return 2
    try:
        records, statuses = collect(args.sweep_dir, args.stale_after)
    except manifest.PlanFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.write(json.dumps(as_json(args.sweep_dir, records, statuses), separators=(",", ":")) + "\n")
    else:
        print(as_text(args.sweep_dir, records, statuses))
    return 0


if __name__ == "__main__":
    sys.exit(main())
