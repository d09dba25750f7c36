"""How much host memory this process may still take: the smallest of every limit that applies to it.

A Slurm job runs under ``--mem`` (``hydra.launcher.mem_gb``), enforced by a cgroup: a process that goes
over it is killed outright, with no chance to write ``error.json``. So before the image bank decodes or
copies a whole dataset on the host it asks :func:`host_memory`, which reads

- the cgroup v2 limit of the process's cgroup and of every cgroup above it (``memory.max`` minus
  ``memory.current``; Slurm puts the job's limit on a cgroup above the task's own);
- the cgroup v1 limit the same way (``memory.limit_in_bytes`` minus ``memory.usage_in_bytes``);
  in both, file pages the kernel can drop (``inactive_file`` of ``memory.stat``: the page cache of the
  files a dataset was read from) count as available, as they do for the kernel before it kills;
- Slurm's own word, ``SLURM_MEM_PER_NODE`` or ``SLURM_MEM_PER_CPU`` × the CPUs on the node (MiB), minus
  what the process holds now (its resident set), for clusters that enforce the limit by polling;
- ``MemAvailable`` of ``/proc/meminfo``: what the machine can give without swapping.

Each reader takes its paths (or environment) as arguments, so tests point them at files of their own;
left out, they are the module's constants, read at call time.
Off Linux every reader finds nothing and :func:`host_memory` returns None (no known limit).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"
MEMINFO = "/proc/meminfo"
PROC_STATUS = "/proc/self/status"
UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a huge number (9223372036854771712)


@dataclass
class HostMemory:
    """Bytes this process may still allocate on the host (``available``), which limit set it
    (``source``), and every limit found (name → bytes still available under it)."""

    available: int
    source: str
    limits: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        others = ", ".join(f"{name} {mib(v)}" for name, v in self.limits.items() if name != self.source)
        return f"{mib(self.available)} ({self.source}{'; also ' + others if others else ''})"


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _int(text: Optional[str]) -> Optional[int]:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _own_cgroup(proc_cgroup: str, controller: Optional[str]) -> Optional[str]:
    """The process's cgroup path: the ``0::PATH`` line (v2, ``controller=None``) or the line whose
    controller list names ``controller`` (v1)."""
    text = _read(Path(proc_cgroup))
    for line in (text or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if (controller is None and parts[0] == "0" and parts[1] == "") or \
                (controller is not None and controller in parts[1].split(",")):
            return parts[2]
    return None


def _cgroup_dirs(root: Path, own: Optional[str]) -> list[Path]:
    """The process's cgroup folder under ``root`` and each folder above it up to ``root``.

    Inside a cgroup namespace (a container) the listed path may not exist under ``root``: then ``root``
    is the process's own cgroup.
    """
    here = root / own.lstrip("/") if own else root
    while here != root and not here.is_dir() and root in here.parents:
        here = here.parent
    dirs = [here]
    while here != root and root in here.parents:
        here = here.parent
        dirs.append(here)
    return dirs


def _stat(path: Path, key: str) -> int:
    for line in (_read(path) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return _int(value) or 0
    return 0


def _cgroup_available(root: Path, own: Optional[str], limit_file: str, usage_file: str,
                      inactive_key: str) -> Optional[int]:
    best = None
    for d in _cgroup_dirs(root, own):
        limit = _int(_read(d / limit_file))  # v2 writes "max" when there is none: not an int
        if limit is None or limit >= UNLIMITED:
            continue
        used = (_int(_read(d / usage_file)) or 0) - _stat(d / "memory.stat", inactive_key)
        left = max(0, limit - max(0, used))
        best = left if best is None else min(best, left)
    return best


def cgroup_v2_available(root: Optional[str] = None, proc_cgroup: Optional[str] = None) -> Optional[int]:
    """Bytes left under the tightest cgroup v2 ``memory.max`` above this process, or None (no limit)."""
    base = Path(root or CGROUP_ROOT)
    if not (base / "cgroup.controllers").exists():
        return None  # not a cgroup v2 hierarchy
    return _cgroup_available(base, _own_cgroup(proc_cgroup or PROC_CGROUP, None), "memory.max", "memory.current",
                             "inactive_file")


def cgroup_v1_available(root: Optional[str] = None, proc_cgroup: Optional[str] = None) -> Optional[int]:
    """Bytes left under the tightest cgroup v1 ``memory.limit_in_bytes``, or None (no limit)."""
    base = Path(root or CGROUP_ROOT) / "memory"
    if not base.is_dir():
        return None
    return _cgroup_available(base, _own_cgroup(proc_cgroup or PROC_CGROUP, "memory"), "memory.limit_in_bytes",
                             "memory.usage_in_bytes", "total_inactive_file")


def resident_bytes(proc_status: Optional[str] = None) -> int:
    """This process's resident set (``VmRSS``), 0 where unknown."""
    for line in (_read(Path(proc_status or PROC_STATUS)) or "").splitlines():
        if line.startswith("VmRSS:"):
            value = _int(line.split()[1])
            return (value or 0) * 1024
    return 0


def slurm_available(environ: Optional[Mapping[str, str]] = None, resident: Optional[int] = None) -> Optional[int]:
    """Bytes left under the job's Slurm memory (``SLURM_MEM_PER_NODE``, else ``SLURM_MEM_PER_CPU`` × the
    job's CPUs on the node; MiB, 0 = the whole node), minus what this process holds; None outside Slurm."""
    env = os.environ if environ is None else environ
    per_node = _int(env.get("SLURM_MEM_PER_NODE"))
    per_cpu = _int(env.get("SLURM_MEM_PER_CPU"))
    if per_node:
        limit = per_node * 2**20
    elif per_cpu:
        cpus = next((c for c in (_int(env.get(v)) for v in ("SLURM_CPUS_ON_NODE", "SLURM_CPUS_PER_TASK"))
                     if c), 1)
        limit = per_cpu * cpus * 2**20
    else:
        return None
    return max(0, limit - (resident_bytes() if resident is None else resident))


def meminfo_available(meminfo: Optional[str] = None) -> Optional[int]:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes, or None."""
    for line in (_read(Path(meminfo or MEMINFO)) or "").splitlines():
        if line.startswith("MemAvailable:"):
            value = _int(line.split()[1])
            return None if value is None else value * 1024
    return None


def host_memory(cgroup_root: Optional[str] = None, proc_cgroup: Optional[str] = None, meminfo: Optional[str] = None,
                environ: Optional[Mapping[str, str]] = None, resident: Optional[int] = None) -> Optional[HostMemory]:
    """The host memory this process may still take: the smallest of every limit found, or None.

    Paths default to the module's :data:`CGROUP_ROOT`, :data:`PROC_CGROUP` and :data:`MEMINFO` (read at
    call time), the environment to ``os.environ``, the resident set to ``/proc/self/status``'s.
    """
    found = {
        "cgroup v2 memory.max": cgroup_v2_available(cgroup_root, proc_cgroup),
        "cgroup v1 memory.limit_in_bytes": cgroup_v1_available(cgroup_root, proc_cgroup),
        "Slurm --mem": slurm_available(environ, resident),
        "MemAvailable": meminfo_available(meminfo),
    }
    limits = {name: v for name, v in found.items() if v is not None}
    if not limits:
        return None
    source = min(limits, key=limits.__getitem__)
    return HostMemory(limits[source], source, limits)
