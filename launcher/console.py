"""What the terminal shows: one line per cell state change, a line per epoch of a running cell (epoch k of
N, its last validation accuracy, the time left), a progress bar, a summary table."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Iterable, Optional, Sequence, TextIO

from launcher.cellstate import CellState, CellStatus
from launcher.manifest import CellRecord

SUMMARY_ROWS = 60  # more cells than this: the table shows the unfinished ones first, then a count


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def distinguishing(records: Sequence[CellRecord]) -> dict[str, str]:
    """Per cell id, the overrides that differ between the cells (those shared by all are noise)."""
    parsed = [dict(_split(o) for o in r.overrides) for r in records]
    keys: list[str] = []
    for p in parsed:
        for k in p:
            if k not in keys:
                keys.append(k)
    varying = [k for k in keys if len({p.get(k) for p in parsed}) > 1]
    return {r.id: " ".join(f"{k}={p[k]}" for k in varying if k in p) for r, p in zip(records, parsed)}


def fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def fmt_result(status: CellStatus, column: tuple[str, str, str]) -> str:
    """A cell's value in the result column ``(header, metric, format)`` an app shows
    (:attr:`launcher.apps.App.column`)."""
    value = status.metrics.get(column[1])
    return "-" if value is None else column[2].format(value)


def fmt_state(status: CellStatus) -> str:
    """The state as the summary shows it: ``PRUNED (after epoch 2)`` for a pruned cell, else the state."""
    epoch = status.metrics.get("pruned/epoch")
    if status.state == CellState.PRUNED and epoch is not None:
        return f"PRUNED (after epoch {epoch:.0f})"
    return status.state.value


def table(rows: Iterable[Sequence[str]], header: Sequence[str]) -> str:
    rows = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    out = []
    for n, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


class Console:
    """Thread-safe terminal output of one launch."""

    def __init__(self, records: Sequence[CellRecord], stream: TextIO = sys.stdout,
                 column: Optional[tuple[str, str, str]] = None) -> None:
        from launcher import apps

        self.stream = stream
        # The result column (header, metric): the app's whose cells these are.
        self.column = column if column is not None else apps.for_records(records).column
        self._records = records
        self._labels: Optional[dict[str, str]] = None
        self.roles = {r.id: r.role for r in records}
        self._lock = threading.Lock()
        self._bar = None
        self._n_run = 0
        self._epochs: dict[str, int] = {}  # per running cell, the last epoch shown

    @property
    def labels(self) -> dict[str, str]:
        """Each cell's distinguishing overrides (computed when first shown: a re-issue of a DONE sweep
        whose summary is printed elsewhere never needs them)."""
        if self._labels is None:
            self._labels = distinguishing(self._records)
        return self._labels

    def say(self, text: str) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.clear()
            print(text, file=self.stream, flush=True)
            if self._bar is not None:
                self._bar.refresh()

    def start_progress(self, total: int) -> None:
        from tqdm import tqdm

        self._n_run = total
        # On stderr, and only on a terminal: logs and pipes get the state-change lines alone.
        self._bar = tqdm(total=total, desc="cells", unit="cell", file=sys.stderr, disable=None,
                         dynamic_ncols=True, leave=False)

    def advance(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.update(1)

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def label(self, cid: str) -> str:
        """The cell's distinguishing overrides, ``[baseline]`` first for a baseline."""
        label = self.labels.get(cid, "")
        return f"[baseline] {label}".rstrip() if self.roles.get(cid) == "baseline" else label

    def cell(self, cid: str, state: CellState, detail: str = "") -> None:
        line = f"{state.value:<9} {cid}  {self.label(cid)}"
        if detail:
            line += f"  {detail}"
        self.say(line)

    def progress(self, cid: str, progress: Optional[dict]) -> None:
        """A line for a running cell that has finished an epoch since the last one shown (its
        ``progress.json``: :mod:`launcher.progress`): epoch k of N, val/acc, the time left."""
        from launcher.progress import describe

        if not progress or not progress.get("epoch") or self._epochs.get(cid) == progress["epoch"]:
            return
        self._epochs[cid] = progress["epoch"]
        self.cell(cid, CellState.RUNNING, describe(progress))

    def summary(self, records: Sequence[CellRecord], statuses: dict[str, CellStatus], sweep_dir: Path) -> None:
        order = list(records)
        if len(order) > SUMMARY_ROWS:
            # The cells that need attention first.
            order.sort(key=lambda r: statuses[r.id].state.settled)
        shown = order[:SUMMARY_ROWS]
        column = self.column
        rows = []
        for r in shown:
            s = statuses[r.id]
            rows.append([r.id, self.label(r.id) or "-", fmt_state(s), fmt_result(s, column), fmt_duration(s.duration_s)])
        text = table(rows, ["cell", "overrides", "state", column[0], "time"])
        if len(order) > len(shown):
            text += f"\n… and {len(order) - len(shown)} more cells (python -m launcher.status {sweep_dir})"
        counts: dict[str, int] = {}
        for r in records:
            st = statuses[r.id].state.value
            counts[st] = counts.get(st, 0) + 1
        tally = ", ".join(f"{n} {st}" for st, n in counts.items())
        self.say(f"\n{text}\n\n{len(records)} cells: {tally}\nsweep folder: {sweep_dir}")


def dry_run_listing(console: Console, records: Sequence[CellRecord], statuses: dict[str, CellStatus],
                    selected: Sequence[str], limit: int = SUMMARY_ROWS, slurm: bool = False) -> str:
    """The table of a dry run: each cell, its state (and Slurm job) and whether it would run. Beyond
    ``limit`` rows (0: no limit) the cells that would run come first and the rest are counted."""
    chosen = set(selected)
    order = list(records)
    if limit and len(order) > limit:
        order.sort(key=lambda r: r.id not in chosen)
    shown = order[:limit] if limit else order
    rows = []
    for r in shown:
        s = statuses[r.id]
        rows.append([r.id, console.label(r.id) or "-", s.state.value] + ([s.job_id or "-"] if slurm else [])
                    + ["yes" if r.id in chosen else "no"])
    header = ["cell", "overrides", "state"] + (["slurm job", "would submit"] if slurm else ["would run"])
    text = table(rows, header)
    if len(order) > len(shown):
        text += (f"\n… and {len(order) - len(shown)} more cells ({len(chosen - {r.id for r in shown})} of them "
                 "would run); hydra.launcher.list_rows=0 lists every cell")
    return text
