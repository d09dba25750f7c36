"""The sweep folder: cell identity on disk, cell states, atomic status files and claims.

This is the file protocol every backend (local pool, Slurm) shares. The filesystem is the source of
truth: no database, no pickle, no lock server — only files written whole (temp file + ``os.replace``)
and claim files created exclusively, which is safe on NFS and Lustre.

Layout of a sweep folder::

    SWEEP_DIR/
      plans/<plan_id>.json      one sweep definition per distinct job list: the cells in order, each
                                with its overrides and paired baseline (see :func:`write_plan`)
      cells/<cell_id>/          one folder per cell, named by its id (the app's hash of the job's config)
        config.yaml             the config snapshot the cell runs from; written once, never changed
        status.json             :class:`CellStatus`; written ONLY by the holder of the cell's claim
        claim.<n>               claim files; the highest generation ``n`` is the current claim
        result.json             written by the cell (``python -m <cell_module> CELL_DIR``) at
        error.json              the end / on failure, beside the app's own files (a trial's checkpoint.pt, tb/)
        stdout.log stderr.log   the cell process's output, appended attempt after attempt
        previous/<stamp>/       results moved aside by a forced rerun (never deleted)
        damaged-<stamp>/        the files of a DAMAGED attempt, moved aside before it is redone

States (:class:`CellState`): no ``status.json`` means PENDING; RUNNING carries the owner's host and pid
(or Slurm job id) and a heartbeat; DONE is written only after ``result.json`` parsed with
``"status": "done"`` (:func:`cell_outcome`); PRUNED when the cell stopped early at a prune request
(``prune.json``: :mod:`launcher.progress`) and left its partial result — finished, not failed, never
rerun but by ``rerun=all``. A RUNNING status whose owner is gone — dead pid on this
host, or a heartbeat older than ``stale_after_s`` — reads as CANCELLED with ``interrupted=True``
(:func:`effective_status`): rerunnable, and a rerun resumes from the cell's checkpoint. An entry that
cannot be trusted (see :func:`launcher.cellstate.read_status`) reads as DAMAGED: it is not DONE,
and the attempt that redoes it first moves its files into ``damaged-<stamp>/`` (:func:`set_aside_damaged`).

How a backend runs one cell (the local pool does exactly this; a Slurm job does it on its node)::

    claim = try_claim(cell_dir)                  # None: a live owner holds it, skip the cell
    if claim:
        try:
            status = read_status(cell_dir)       # re-read AFTER claiming: DONE meanwhile -> skip
            status = status.started_by(claim.owner, pid=child_pid)   # attempts += 1, RUNNING
            write_status(cell_dir, status)
            ... every heartbeat: claim.heartbeat(); write_status(cell_dir, status.beat())
            state, error, metrics = cell_outcome(cell_dir, returncode)
            write_status(cell_dir, status.finished(state, ...))
        finally:
            claim.release()

Only the claim holder writes ``status.json``; the planner writes ``config.yaml`` (once) and plans;
the cell writes its results. No file has two writers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence

from launcher.cellstate import (
    CELLS,
    DEFAULT_STALE_AFTER_S,
    HOST,
    CellState,
    Owner,
    cells_root,
    effective_status,
    error_headline,
    is_cell_id,
    owner_gone,
    pruned_note,
    read_pruned,
    read_result,
    read_status,
    result_size,
)
from launcher import apps
from launcher.fileio import (
    CONFIG,
    ERROR,
    RESULT,
    digest,
    read_json,
    write_text_atomic,
)

if TYPE_CHECKING:
    from launcher.cellstate import CellStatus

PLANS = "plans"
STDOUT = "stdout.log"
STDERR = "stderr.log"
PREVIOUS = "previous"
DAMAGED_PREFIX = "damaged-"
CLAIM_PREFIX = "claim."
ERROR_TAIL_LINES = 12


class Rerun(str, enum.Enum):
    """Which cells a launch runs."""

    NOT_DONE = "not_done"  # default: every cell that is neither DONE nor PRUNED (interrupted ones resume)
    FAILED = "failed"  # only cells that ended FAILED, TIMEOUT, CANCELLED (or were interrupted) or DAMAGED
    DAMAGED = "damaged"  # only DAMAGED cells (an entry that cannot be trusted), their files set aside first
    ALL = "all"  # force: every cell; earlier results are moved to the cell's previous/<stamp>/

    @classmethod
    def parse(cls, value: str) -> "Rerun":
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"hydra.launcher.rerun={value!r} is not allowed; choose one of: "
                             f"{', '.join(r.value for r in cls)}") from None

    def wants(self, state: CellState) -> bool:
        if self is Rerun.ALL:
            return True
        if self is Rerun.FAILED:
            return state.failed
        if self is Rerun.DAMAGED:
            return state == CellState.DAMAGED
        return not state.settled


# ---------------------------------------------------------------------------------------------------
# Claims


@dataclass
class Claim:
    """A held claim on one cell (file ``claim.<generation>``). Release it when the attempt ends."""

    cell: Path
    generation: int
    owner: Owner

    @property
    def path(self) -> Path:
        return self.cell / f"{CLAIM_PREFIX}{self.generation}"

    def heartbeat(self) -> None:
        """Touch the claim file: its mtime is the heartbeat other hosts judge staleness by."""
        try:
            os.utime(self.path)
        except OSError:
            pass

    def release(self) -> None:
        try:
            self.path.unlink(missing_ok=True)
        except OSError:  # a store gone read-only: the claim stays, and its owner's death frees it
            pass


def _claim_generations(cell: Path) -> list[int]:
    gens = []
    try:
        names = os.listdir(cell)
    except FileNotFoundError:
        return gens
    for name in names:
        if name.startswith(CLAIM_PREFIX):
            try:
                gens.append(int(name[len(CLAIM_PREFIX):]))
            except ValueError:
                pass
    return sorted(gens)


def claim_holder(cell: Path, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> Optional[Owner]:
    """The live owner of the cell's current claim, or None (no claim, or its owner is gone)."""
    gens = _claim_generations(cell)
    if not gens:
        return None
    path = Path(cell) / f"{CLAIM_PREFIX}{gens[-1]}"
    d = read_json(path)
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    if d is None:
        # Claims are linked into place complete, so an unreadable claim is foreign or damaged:
        # judge it by its age only.
        return None if time.time() - mtime > stale_after_s else Owner(HOST, -1, None, "?")
    try:
        owner = Owner.from_dict(d)
    except ValueError:  # a claim with wrong types: foreign or damaged, judged by its age like one unreadable
        return None if time.time() - mtime > stale_after_s else Owner(HOST, -1, None, "?")
    if owner_gone(owner.host, owner.pid, owner.start, mtime, stale_after_s):
        return None
    return owner


def try_claim(cell: Path, owner: Optional[Owner] = None,
              stale_after_s: float = DEFAULT_STALE_AFTER_S) -> Optional[Claim]:
    """Claim the cell for ``owner`` (default: this process), or None when a live owner holds it.

    Claims are generations ``claim.1``, ``claim.2``, …; the highest is current. To claim, a process
    creates the next generation exclusively: it writes a unique temp file and ``os.link``s it to the
    claim name. ``link`` fails if the name exists, atomically, also on NFS (where ``O_EXCL`` on
    ``open`` used to be unreliable); if the server's reply is lost, the temp file's link count
    (2 = we made the link) tells the truth. A claim whose owner is gone (dead pid on this host, or a
    stale heartbeat elsewhere) is taken over by creating the generation above it, so of two processes
    reclaiming at once exactly one wins, and nobody ever deletes a live claim.

    After claiming, re-read ``status.json``: the cell may have been finished by the previous holder.
    """
    cell = Path(cell)
    owner = owner or Owner.this_process()
    cell.mkdir(parents=True, exist_ok=True)
    for _ in range(20):
        gens = _claim_generations(cell)
        top = gens[-1] if gens else 0
        if top and claim_holder(cell, stale_after_s) is not None:
            return None
        new = cell / f"{CLAIM_PREFIX}{top + 1}"
        tmp = cell / f".claim.{owner.host}.{owner.pid}.{owner.token}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(owner.to_dict(), f)
                f.flush()
                os.fsync(f.fileno())
        except OSError:  # a full or read-only store: no claim, and no half-written temp file left behind
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        try:
            os.link(tmp, new)
            won = True
        except FileExistsError:
            won = False
        except OSError:
            won = os.stat(tmp).st_nlink == 2
        finally:
            tmp.unlink(missing_ok=True)
        if won:
            for g in gens:  # superseded claims of gone owners: tidy, best effort
                (cell / f"{CLAIM_PREFIX}{g}").unlink(missing_ok=True)
            return Claim(cell=cell, generation=top + 1, owner=owner)
        # Someone created that generation first: look again (it may be live now).
    return None


# ---------------------------------------------------------------------------------------------------
# Outcome of one attempt


def tail(path: Path, lines: int = ERROR_TAIL_LINES, max_bytes: int = 16384) -> str:
    """The last ``lines`` non-empty lines of a text file ('' if missing)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    data = data.replace("\r", "\n")
    kept = [ln for ln in data.splitlines() if ln.strip()]
    return "\n".join(kept[-lines:])


def cell_outcome(cell: Path, returncode: Optional[int], *, timed_out: bool = False,
                 interrupted: bool = False) -> tuple[CellState, Optional[str], dict]:
    """Judge a finished attempt: ``(state, error tail or None, summary metrics)``.

    DONE needs exit code 0 AND a parsed ``result.json`` with ``"status": "done"``; PRUNED, exit code 0 and
    the partial ``result.json`` of a cell stopped at a prune request (``"status": "pruned"``:
    :func:`launcher.cellstate.read_pruned`), its error the one line saying when and why. ``timed_out`` /
    ``interrupted`` say the launcher itself stopped the cell (TIMEOUT / CANCELLED). A cell killed by a
    signal nobody in the launcher sent is CANCELLED as well: rerunnable, it resumes from its checkpoint.
    """
    cell = Path(cell)
    if timed_out:
        return CellState.TIMEOUT, "timed out: the launcher killed the cell's process group", {}
    if interrupted:
        return CellState.CANCELLED, "interrupted by the launcher (Ctrl-C or SIGTERM); rerun to resume", {}
    if returncode == 0:
        result = read_result(cell)
        if result is not None:
            m = result.get("metrics") or {}
            metrics = {k: m[k] for k in apps.summary_metrics() if k in m}
            timing = result.get("timing") or {}
            for k in ("train_s", "total_s"):
                if k in timing:
                    metrics[f"timing/{k}"] = timing[k]
            return CellState.DONE, None, metrics
        pruned = read_pruned(cell)
        if pruned is not None:
            m = pruned.get("metrics") or {}
            metrics = {k: m[k] for k in (*apps.summary_metrics(), "val/acc") if k in m}
            epoch = (pruned.get("pruned") or {}).get("epoch")
            if isinstance(epoch, int) and not isinstance(epoch, bool):
                metrics["pruned/epoch"] = epoch
            return CellState.PRUNED, pruned_note(pruned), metrics
        return CellState.FAILED, (f"the cell exited 0 but {RESULT} is missing or not a finished result\n"
                                  + tail(cell / STDERR)), {}
    if returncode is not None and returncode < 0:
        import signal

        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return CellState.CANCELLED, f"killed by {name} (not by the launcher); rerun to resume", {}
    err = read_json(cell / ERROR)
    if err is not None:
        head = f"{err.get('type', 'Error')}: {err.get('error', '')}".strip()
        tb = "\n".join(str(err.get("traceback", "")).strip().splitlines()[-ERROR_TAIL_LINES:])
        return CellState.FAILED, (tb + "\n" + head).strip() if tb else head, {}
    return CellState.FAILED, (f"exit code {returncode}\n" + tail(cell / STDERR)).strip(), {}


def move_aside(cell: Path, damaged: bool = False, keep: Iterable[str] = ()) -> Optional[Path]:
    """Move a cell's results, checkpoint, logs and status into ``previous/<stamp>/`` (a forced rerun),
    or with ``damaged`` into ``damaged-<stamp>/`` (a DAMAGED cell about to be redone from scratch).

    Keeps ``config.yaml``, the claim, the folders of earlier moves and the files named in ``keep``.
    Returns the folder they went to, or None if nothing moved. Call only while holding the claim.
    """
    cell = Path(cell)
    keep = {CONFIG, PREVIOUS, *keep}
    movable = [p for p in cell.iterdir()
               if p.name not in keep and not p.name.startswith((CLAIM_PREFIX, ".", DAMAGED_PREFIX))]
    if not movable:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = cell / (DAMAGED_PREFIX + stamp) if damaged else cell / PREVIOUS / stamp
    n = 1
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
    dest.mkdir(parents=True)
    for p in movable:
        shutil.move(str(p), str(dest / p.name))
    return dest


# ---------------------------------------------------------------------------------------------------
# Sweep definitions (plans)


@dataclass
class CellRecord:
    """One cell of a sweep definition: its id, the overrides that name it, its paired baseline."""

    id: str
    overrides: list[str]
    baseline: Optional[str] = None  # id of the paired baseline (proxy cells only)
    role: str = "proxy"  # "proxy" or "baseline"

    def to_dict(self) -> dict:
        return {"id": self.id, "overrides": list(self.overrides), "baseline": self.baseline, "role": self.role}


def set_aside_entry(path: str | Path) -> str:
    """Rename a file found where a cell folder (or store entry) belongs to ``<name>.damaged-<stamp>``
    beside it (kept, never deleted); returns the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = f"{path}.{DAMAGED_PREFIX}{stamp}"
    n = 1
    while os.path.lexists(dest):
        n += 1
        dest = f"{path}.{DAMAGED_PREFIX}{stamp}.{n}"
    os.rename(path, dest)
    return dest


def set_aside_damaged(cell: Path, keep: Iterable[str] = ()) -> Optional[Path]:
    """Move every file of a DAMAGED cell but its ``config.yaml`` (and the files named in ``keep``) into
    ``damaged-<stamp>/`` (kept, never deleted) so that it is redone from scratch; returns that folder.
    Call only while holding the claim."""
    return move_aside(cell, damaged=True, keep=keep)


def adopted(cell: Path, status: "CellStatus") -> "CellStatus":
    """The DONE status of a cell whose finished result nobody recorded (its launcher died first, or it
    was run by hand): at least one attempt, its duration and end from ``result.json``. PRUNED for the
    partial result of a cell stopped at a prune request (:func:`adoptable`)."""
    state, error, metrics = cell_outcome(cell, 0)
    new = status.finished(state, exit_code=0, error=error, metrics=metrics,
                          result_size=result_size(cell) if state == CellState.DONE else None)
    result = read_result(cell) or read_pruned(cell) or {}
    total = (result.get("timing") or {}).get("total_s")
    try:
        ended = os.stat(Path(cell) / RESULT).st_mtime
    except OSError:
        ended = new.ended
    duration = total if isinstance(total, (int, float)) and not isinstance(total, bool) else (
        None if status.started is None else round(ended - status.started, 3))
    return dataclasses.replace(new, attempts=max(1, status.attempts), ended=ended, duration_s=duration)


def adoptable(cell: Path) -> bool:
    """Whether the cell holds a result nobody recorded that ends it: finished (DONE) or pruned (PRUNED)."""
    return read_result(cell) is not None or read_pruned(cell) is not None


# ---------------------------------------------------------------------------------------------------
# Reading a sweep's cells: what every backend (and its dry run) decides from


def store_dir(store: Optional[str | Path]) -> Optional[str]:
    """The absolute path of a backend's ``hydra.launcher.store`` option (None: no store)."""
    return str(Path(store).absolute()) if store else None


def cell_entry(sweep_dir: Path | str, cid: str, store: Optional[str] = None) -> str:
    """Where a cell's files are read: the sweep folder's cell, or, when the sweep has not linked it (a
    dry run into a new sweep folder writes nothing), the entry of the same id in ``store``
    (:func:`store_dir`)."""
    d = os.path.join(sweep_dir, CELLS, cid)
    if store is not None and not os.path.lexists(d):
        stored = os.path.join(store, cid)
        if os.path.lexists(stored):
            return stored
    return d


def entry_status(entry: str, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> "CellStatus":
    """The status a launch decides from, of the cell read at ``entry`` (:func:`cell_entry`): DAMAGED
    when the entry cannot be trusted, CANCELLED when its owner is gone (RUNNING while its orphaned
    process still runs here)."""
    return effective_status(read_status(entry), stale_after_s, cell=entry)


def prepare_rerun(cell: Path, status: "CellStatus", rerun: Rerun,
                  say: Optional[Callable[[str], None]] = None) -> Optional["CellStatus"]:
    """Before a cell whose ``status`` (read under its claim) is run again: a DAMAGED cell's files are
    set aside (:func:`set_aside_damaged`), and with ``rerun=all`` earlier results are moved to
    ``previous/<stamp>/`` (:func:`move_aside`). Returns the status the new attempt starts from (the
    attempts so far, nothing else), or None when nothing was moved. ``say`` gets one line per move.
    Call only while holding the claim."""
    from launcher.cellstate import CellStatus

    cid = Path(cell).name
    if status.state == CellState.DAMAGED:  # redone from scratch, its files kept aside
        moved = set_aside_damaged(cell)
        line = f"          {cid}  damaged files moved to {moved}"
    elif rerun is Rerun.ALL:
        moved = move_aside(cell)
        line = f"          {cid}  earlier results moved to {moved}"
    else:
        return None
    if moved is not None and say is not None:
        say(line)
    return CellStatus(attempts=status.attempts)


def say_damaged(console: Any, ids: Sequence[str], statuses: dict[str, "CellStatus"], sweep_dir: Path,
                limit: int = 20) -> None:
    """One line per DAMAGED cell (up to ``limit``, then a count): which cell, and why."""
    damaged = [cid for cid in ids if statuses[cid].state == CellState.DAMAGED]
    for cid in damaged[:limit]:
        console.cell(cid, CellState.DAMAGED, error_headline(statuses[cid].error))
    if len(damaged) > limit:
        console.say(f"… and {len(damaged) - limit} more DAMAGED cells (python -m launcher.status {sweep_dir})")


# ---------------------------------------------------------------------------------------------------
# Write failures of the sweep folder or the store


# A write that fails with one of these means the folder cannot take writes (full, read-only, over quota,
# no permission, a failing disk): the launch ends cleanly, saying so in one line.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EIO,
                          errno.EFBIG})


def is_write_failure(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in WRITE_ERRNOS


def write_failure_line(e: OSError, resume: bool = True) -> str:
    """The one line that says what could not be written, where, and what to do."""
    where = f" {e.filename}" if e.filename else ""
    what = os.strerror(e.errno) if e.errno else str(e)
    tail = ("; free space or make it writable, then re-issue the same command to resume" if resume
            else "; free space or make it writable, then run again")
    return f"cannot write{where} ({what}){tail}"


def check_writable(folder: Path) -> None:
    """Raise the ``OSError`` a write into ``folder`` meets (its ``filename`` the folder), if any."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(folder)) from None


def write_hydra_metadata(cell: Path, overrides: Sequence[str]) -> None:
    """``.hydra/overrides.yaml`` (the job's overrides) and ``.hydra/config.yaml`` (a link to the cell's
    snapshot), where Hydra's tools look for a job's config; written as a cell starts, as Hydra does."""
    import yaml

    meta = Path(cell) / ".hydra"
    meta.mkdir(exist_ok=True)
    write_text_atomic(meta / "overrides.yaml", yaml.safe_dump(list(overrides)), fsync=False)
    if not os.path.lexists(meta / CONFIG):
        os.symlink(os.path.join("..", CONFIG), meta / CONFIG)


def plan_id(job_overrides: Any) -> str:
    """The id of a sweep's list of jobs (each a list of override strings), in the order given."""
    return digest([list(j) for j in job_overrides])


def write_plan(sweep_dir: Path, plan_id: str, cells: Iterable[CellRecord], extra: Optional[dict] = None) -> Path:
    """Record a sweep definition as ``plans/<plan_id>.json`` (atomic; identical content if rewritten)."""
    path = Path(sweep_dir) / PLANS / f"{plan_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # One line per key and per cell, through json's C encoder (an indented dump of 10,000 cells is slow).
    head = {"version": 1, **(extra or {})}
    lines = [f"{json.dumps(k)}: {json.dumps(v, default=str)}" for k, v in head.items()]
    body = ",\n  ".join(json.dumps(c.to_dict()) for c in cells)
    text = "{\n" + ",\n".join(lines) + (",\n" if lines else "") + f'"cells": [\n  {body}\n]\n}}\n'
    write_text_atomic(path, text)
    return path


class PlanFileError(ValueError):
    """A plan file that names something other than cells (the message names the file)."""


def plan_cells(path: Path, d: dict) -> list[CellRecord]:
    """The cells a parsed plan file lists, each id checked to be a cell id (12 hex digits) before it
    names a folder: a crafted or damaged file is refused (:class:`PlanFileError`), naming the file."""
    cells = d.get("cells", [])
    if not isinstance(cells, list):
        raise PlanFileError(f"{path}: its cells are not a list; the file is damaged: remove it and re-issue "
                            "the sweep command")
    out = []
    for c in cells:
        cid = c.get("id") if isinstance(c, dict) else None
        if not is_cell_id(cid):
            raise PlanFileError(f"{path}: {json.dumps(cid, default=str)[:60]} is not a cell id (12 hex "
                                "digits); the file is damaged or crafted: remove it and re-issue the sweep "
                                "command")
        baseline = c.get("baseline")
        if baseline is not None and not is_cell_id(baseline):
            raise PlanFileError(f"{path}: cell {cid} names {json.dumps(baseline, default=str)[:60]} as its "
                                "baseline, not a cell id; the file is damaged or crafted: remove it and "
                                "re-issue the sweep command")
        overrides = c.get("overrides", [])
        out.append(CellRecord(id=cid, overrides=[str(o) for o in overrides] if isinstance(overrides, list) else [],
                              baseline=baseline, role=str(c.get("role", "proxy"))))
    return out


def read_plans(sweep_dir: Path) -> list[CellRecord]:
    """Every cell any plan of the sweep folder names, first mention first (deduplicated by id).

    Cell folders that no plan names (e.g. a plan file was deleted) are appended, with no overrides.
    Raises :class:`PlanFileError` for a plan naming something that is not a cell id.
    """
    sweep_dir = Path(sweep_dir)
    seen: dict[str, CellRecord] = {}
    plan_dir = sweep_dir / PLANS
    paths = sorted(plan_dir.glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name)) if plan_dir.is_dir() else []
    for path in paths:
        for rec in plan_cells(path, read_json(path) or {}):
            seen.setdefault(rec.id, rec)
    root = cells_root(sweep_dir)
    if root.is_dir():
        for name in sorted(os.listdir(root)):
            if name not in seen and is_cell_id(name):  # not a set-aside ``<id>.damaged-<stamp>`` file
                seen[name] = CellRecord(id=name, overrides=[], role="unknown")
    return list(seen.values())
