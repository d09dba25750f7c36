"""A running cell's progress, and the request that stops it early (pruning): two small files in its folder.

The protocol between the launcher and a cell that trains for epochs (this project's trials follow it:
``proxyattention.train``); a cell that writes neither file simply shows no progress and is never pruned.

``progress.json`` — written by the cell when training starts and after every epoch, atomically (temp file + ``os.replace``), so a reader never sees half of it::

    {"version": 1, "epoch": 2, "epochs": 4,          epochs done, epochs in all
     "started": 1700000000.0, "updated": 1700000123.4,  this attempt's start, the last write (Unix s)
     "resumed_from": null,                           the checkpoint epoch this attempt resumed from
     "epoch_s": [61.2, 60.8],                        wall seconds of each epoch done (train, validation,
                                                     proxy step, checkpoint)
     "history": [{"epoch": 1, "val/acc": 0.61, "val/loss": 1.2, "val/acc_best": 0.61,
                  "train/loss": 1.9, "train/acc": 0.4}, …]}   one small row per epoch done

``val/acc_best`` in a row is the best ``val/acc`` up to that epoch, so every validation objective of
:mod:`launcher.objective` has a value at every epoch (:func:`metric_by_epoch`). The file holds no
per-image data; its size grows by one row per epoch. ``launcher.status`` and the local console read it
for RUNNING cells (:func:`summary`: epoch k of N, the last validation accuracy, the time left); it is in
the cell folder, so Slurm cells on a shared filesystem show the same.

``prune.json`` — a request to stop the cell early, written by whoever decides (a sweeper's pruner) with
:func:`request_prune`. The trial looks for it at every epoch boundary (after validation, the checkpoint and
``progress.json``; and before its first epoch, for a request made while it was not running): when it is
there, the trial stops, writes ``result.json`` with ``"status": "pruned"``, its partial history and
metrics so far and ``"pruned": {"epoch", "epochs", "reason", "requested"}``, and exits 0; its launcher
records the cell PRUNED (:class:`launcher.cellstate.CellState`). A pruned result is never a
finished result: readers of finished results (``read_result``, the report) leave it out.

``judged.json`` — ``{"epoch": k, "updated": t, "poll_s": p}``: a pruner's monitor has read the cell's
epochs up to ``k`` and decided (:func:`mark_judged`; it rewrites the file when ``k`` changes and at least
every ``p`` seconds while it watches the cell, and removes it when it stops). A cell being watched waits at its epoch boundary for
the verdict on the epoch it has just finished (:func:`await_judgement`), so a prune request stops it
before another epoch starts, not one epoch later. Without the file, or with one not rewritten for a
while (its monitor has gone), the cell does not wait; it never waits longer than a few polls.

Standard library only: the launcher reads these files without torch.
"""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Optional

from launcher.fileio import read_json, write_json_atomic

PROGRESS = "progress.json"
PRUNE = "prune.json"
JUDGED = "judged.json"
VERSION = 1

# The keys of a history row kept in progress.json (those the trial has), in this order.
ROW_KEYS = ("epoch", "val/acc", "val/loss", "val/acc_best", "train/loss", "train/acc")


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# ---------------------------------------------------------------------------------------- the trial side


def progress_row(row: dict[str, Any], best: Optional[float]) -> dict[str, Any]:
    """The small row of one epoch: its validation (and training) numbers, ``val/acc_best`` so far."""
    values = {**row, "val/acc_best": best}
    return {k: values[k] for k in ROW_KEYS if _number(values.get(k))}


def progress_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`progress_row` of every epoch of a trial's history (``val/acc_best`` accumulated)."""
    rows, best = [], None
    for row in history:
        acc = row.get("val/acc")
        if _number(acc) and not math.isnan(acc):
            best = acc if best is None else max(best, acc)
        rows.append(progress_row(row, best))
    return rows


def write_progress(cell: str | Path, *, epoch: int, epochs: int, history: list[dict[str, Any]],
                   epoch_s: list[float], started: float, resumed_from: Optional[int] = None) -> dict:
    """Write ``progress.json`` (atomically, without fsync: it is rewritten every epoch); returns it.
    ``history`` is the trial's own (full) history; only :func:`progress_rows` of it is written."""
    d = {"version": VERSION, "epoch": int(epoch), "epochs": int(epochs), "started": started,
         "updated": time.time(), "resumed_from": resumed_from,
         "epoch_s": [round(float(s), 3) for s in epoch_s], "history": progress_rows(history)}
    write_json_atomic(Path(cell) / PROGRESS, d, fsync=False)
    return d


def prune_request(cell: str | Path) -> Optional[dict]:
    """The prune request in the cell folder, or None when there is none.

    A ``prune.json`` that cannot be parsed still asks to stop (it is written atomically, so that is a
    foreign or damaged file, not one being written); its reason then says so."""
    path = os.path.join(cell, PRUNE)
    if not os.path.lexists(path):
        return None
    d = read_json(path)
    if d is None:
        return {"reason": f"{PRUNE} (unreadable)", "requested": None}
    reason = d.get("reason")
    requested = d.get("requested")
    return {"reason": str(reason) if reason is not None else "no reason given",
            "requested": requested if _number(requested) else None}


def await_judgement(cell: str | Path, epoch: int, *, clock: Callable[[], float] = time.time,
                    sleep: Callable[[float], None] = time.sleep) -> bool:
    """Wait until a watching monitor has judged ``epoch`` (its ``judged.json`` says ``epoch`` or later) or
    asked the cell to stop; True then. False at once when no live monitor watches the cell (no
    ``judged.json``, or one older than :data:`STALE_POLLS` of its polls), and False after waiting that
    long without a verdict (the monitor stalled: training goes on)."""
    start = clock()
    while True:
        if prune_request(cell) is not None:
            return True
        d = read_json(os.path.join(cell, JUDGED))
        if not d or not _count(d.get("epoch")) or not _number(d.get("updated")) or not _number(d.get("poll_s")):
            return False
        patience = STALE_POLLS * max(float(d["poll_s"]), 0.1)
        now = clock()
        if d["epoch"] >= epoch:
            return True
        if now - float(d["updated"]) > patience or now - start > patience:
            return False
        sleep(min(0.05, float(d["poll_s"]) / 4))


# A monitor's judged.json not rewritten for this many of its polls is a gone monitor's.
STALE_POLLS = 3


def mark_judged(cell: str | Path, epoch: int, poll_s: float) -> None:
    """The monitor's side: the cell's epochs up to ``epoch`` are judged (rewritten every poll)."""
    write_json_atomic(Path(cell) / JUDGED, {"epoch": int(epoch), "updated": time.time(), "poll_s": float(poll_s)},
                      fsync=False)


def clear_judged(cell: str | Path) -> None:
    """The monitor stops watching the cell: it no longer waits for verdicts."""
    try:
        os.unlink(os.path.join(cell, JUDGED))
    except OSError:
        pass


# ---------------------------------------------------------------------------------------- the reader side


def read_progress(cell: str | Path) -> Optional[dict]:
    """The cell's ``progress.json``, or None when it is missing, damaged or not the expected shape.

    Checked: ``epoch`` and ``epochs`` are counts (``epochs`` ≥ 1, ``epoch`` ≤ ``epochs``), ``history`` a list
    of objects, ``epoch_s`` a list of numbers. Never raises."""
    d = read_json(os.path.join(cell, PROGRESS))
    if d is None:
        return None
    epoch, epochs = d.get("epoch"), d.get("epochs")
    if not (_count(epoch) and _count(epochs) and epochs >= 1 and epoch <= epochs):
        return None
    history, epoch_s = d.get("history", []), d.get("epoch_s", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        return None
    if not isinstance(epoch_s, list) or not all(_number(s) for s in epoch_s):
        return None
    for key in ("started", "updated"):
        if d.get(key) is not None and not _number(d[key]):
            return None
    return d


def metric_by_epoch(progress: Optional[dict], name: str) -> dict[int, float]:
    """``{epoch: value}`` of the metric ``name`` (e.g. ``val/acc_best``) in a progress record (finite
    numbers only; {} without a record). A sweeper's intermediate values: with a paired baseline, subtract
    the baseline's value of the same epoch."""
    out: dict[int, float] = {}
    for row in (progress or {}).get("history", []):
        e, v = row.get("epoch"), row.get(name)
        if _count(e) and _number(v) and math.isfinite(v):
            out[int(e)] = float(v)
    return out


def eta_s(progress: Optional[dict], now: Optional[float] = None) -> Optional[float]:
    """Seconds left to train: the mean epoch time × the epochs left, less the time already spent on the
    current epoch (never below 0). None before the first epoch has been timed. Testing and
    explainability after the last epoch are not counted."""
    if not progress:
        return None
    times = [s for s in progress.get("epoch_s", []) if _number(s)]
    if not times:
        return None
    left = max(0, progress["epochs"] - progress["epoch"])
    if left == 0:
        return 0.0
    eta = sum(times) / len(times) * left
    updated = progress.get("updated")
    if _number(updated):
        eta -= max(0.0, (now if now is not None else time.time()) - updated)
    return max(0.0, eta)


def summary(progress: Optional[dict], now: Optional[float] = None) -> Optional[dict]:
    """What ``launcher.status --json`` shows of a running cell: ``{"epoch", "epochs", "val/acc",
    "val/acc_best", "epoch_s" (mean), "eta_s", "updated"}`` (None where unknown); None without a record."""
    if not progress:
        return None
    last = (progress.get("history") or [{}])[-1]
    times = [s for s in progress.get("epoch_s", []) if _number(s)]

    def num(v: object) -> Optional[float]:
        return float(v) if _number(v) and math.isfinite(v) else None

    eta = eta_s(progress, now)
    return {"epoch": progress["epoch"], "epochs": progress["epochs"], "val/acc": num(last.get("val/acc")),
            "val/acc_best": num(last.get("val/acc_best")),
            "epoch_s": round(sum(times) / len(times), 3) if times else None,
            "eta_s": None if eta is None else round(eta, 1), "updated": progress.get("updated")}


def describe(progress: Optional[dict], now: Optional[float] = None) -> str:
    """One short line: ``epoch 2/4  val/acc 0.8120  ~1.2m of training left`` (``training done`` after the last
    epoch; '' without a record)."""
    s = summary(progress, now)
    if s is None:
        return ""
    parts = [f"epoch {s['epoch']}/{s['epochs']}"]
    if s["val/acc"] is not None:
        parts.append(f"val/acc {s['val/acc']:.4f}")
    if s["epoch"] == s["epochs"]:
        parts.append("training done")  # testing (and explainability) now
    elif s["eta_s"] is not None:
        parts.append(f"~{fmt_seconds(s['eta_s'])} of training left")  # then testing, explainability
    return "  ".join(parts)


def fmt_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def request_prune(cell: str | Path, reason: str) -> Path:
    """Ask the trial in ``cell`` to stop at its next epoch boundary: writes ``prune.json``
    (``{"reason", "requested", "host", "pid"}``) atomically; returns its path. Idempotent: a second request
    replaces the first. The cell ends PRUNED (its launcher records it) once the trial has seen it; a cell
    that is not running is pruned when it next starts (before its first epoch, or its first after a
    resume). A forced rerun (``rerun=all``) moves the request aside with the cell's other results."""
    path = Path(cell) / PRUNE
    write_json_atomic(path, {"reason": str(reason), "requested": time.time(), "host": socket.gethostname(),
                             "pid": os.getpid()})
    return path
