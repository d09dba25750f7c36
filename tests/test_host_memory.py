"""Host memory in the image bank's choice, from stand-in cgroup, Slurm and /proc files; and a Slurm cell
killed for memory shown as such, with the fix."""

import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from proxyattention.config import DatasetConfig
from proxyattention.data import hostmemory
from proxyattention.data.bank import HOST_SHARE, ImageBank, choose_mode
from proxyattention.data.hostmemory import (
    HostMemory,
    cgroup_v1_available,
    cgroup_v2_available,
    host_memory,
    meminfo_available,
    slurm_available,
)
from proxyattention.data.registry import load_samples
from proxyattention.data.samples import DataError, Samples

GiB, MiB = 2**30, 2**20
JOB = "system.slice/slurmstepd.scope/job_42"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def cgroup_v2(root: Path, limit: int, current: int, inactive: int = 0) -> Path:
    """A cgroup v2 tree as Slurm makes it: the limit on the job, the process in a task below it."""
    write(root / "cgroup" / "cgroup.controllers", "cpuset cpu io memory pids\n")
    write(root / "cgroup" / JOB / "memory.max", f"{limit}\n")
    write(root / "cgroup" / JOB / "memory.current", f"{current}\n")
    write(root / "cgroup" / JOB / "memory.stat", f"anon {current - inactive}\ninactive_file {inactive}\n")
    write(root / "cgroup" / JOB / "step_0" / "user" / "task_0" / "memory.max", "max\n")
    write(root / "cgroup" / JOB / "step_0" / "user" / "task_0" / "memory.current", f"{current // 2}\n")
    write(root / "proc_cgroup", f"0::/{JOB}/step_0/user/task_0\n")
    return root


def test_cgroup_v2_limit_of_the_job_above_the_task_counts_reclaimable_cache_as_free(tmp_path):
    cgroup_v2(tmp_path, limit=4 * GiB, current=2 * GiB, inactive=GiB // 2)
    got = cgroup_v2_available(str(tmp_path / "cgroup"), str(tmp_path / "proc_cgroup"))
    assert got == 4 * GiB - (2 * GiB - GiB // 2)
    # Inside a container the process's cgroup is the root of what it sees.
    write(tmp_path / "ns" / "cgroup.controllers", "memory\n")
    write(tmp_path / "ns" / "memory.max", f"{GiB}\n")
    write(tmp_path / "ns" / "memory.current", f"{GiB // 4}\n")
    write(tmp_path / "ns_proc", "0::/\n")
    assert cgroup_v2_available(str(tmp_path / "ns"), str(tmp_path / "ns_proc")) == 3 * GiB // 4
    write(tmp_path / "ns" / "memory.max", "max\n")
    assert cgroup_v2_available(str(tmp_path / "ns"), str(tmp_path / "ns_proc")) is None


def test_cgroup_v1_limit_ignores_the_unlimited_root(tmp_path):
    mem = tmp_path / "cgroup" / "memory"
    write(mem / "memory.limit_in_bytes", "9223372036854771712\n")
    write(mem / "slurm" / "uid_1" / "job_7" / "memory.limit_in_bytes", f"{2 * GiB}\n")
    write(mem / "slurm" / "uid_1" / "job_7" / "memory.usage_in_bytes", f"{3 * GiB // 2}\n")
    write(mem / "slurm" / "uid_1" / "job_7" / "memory.stat", "cache 0\ntotal_inactive_file 0\n")
    write(tmp_path / "proc_cgroup", "5:cpuset:/\n4:memory:/slurm/uid_1/job_7/step_batch\n0::/\n")
    assert cgroup_v1_available(str(tmp_path / "cgroup"), str(tmp_path / "proc_cgroup")) == GiB // 2


def test_slurm_mem_per_node_or_per_cpu_minus_what_the_process_holds():
    assert slurm_available({"SLURM_MEM_PER_NODE": "3000"}, resident=1000 * MiB) == 2000 * MiB
    per_cpu = {"SLURM_MEM_PER_CPU": "1000", "SLURM_CPUS_ON_NODE": "4"}
    assert slurm_available(per_cpu, resident=500 * MiB) == 3500 * MiB
    assert slurm_available({"SLURM_MEM_PER_NODE": "0"}, resident=0) is None  # --mem=0: the whole node
    assert slurm_available({}, resident=0) is None


def test_the_smallest_limit_wins_and_is_named(tmp_path):
    cgroup_v2(tmp_path, limit=8 * GiB, current=GiB)
    write(tmp_path / "meminfo", "MemTotal: 65536000 kB\nMemAvailable:   20971520 kB\n")
    assert meminfo_available(str(tmp_path / "meminfo")) == 20 * GiB
    kw = dict(cgroup_root=str(tmp_path / "cgroup"), proc_cgroup=str(tmp_path / "proc_cgroup"),
              meminfo=str(tmp_path / "meminfo"), resident=GiB)
    got = host_memory(environ={}, **kw)
    assert (got.available, got.source) == (7 * GiB, "cgroup v2 memory.max")
    got = host_memory(environ={"SLURM_MEM_PER_NODE": "4096"}, **kw)
    assert (got.available, got.source) == (3 * GiB, "Slurm --mem")
    assert "cgroup v2 memory.max 7,168 MiB" in got.describe() and "MemAvailable 20,480 MiB" in got.describe()
    assert host_memory(cgroup_root=str(tmp_path / "none"), proc_cgroup=str(tmp_path / "none"),
                       meminfo=str(tmp_path / "none"), environ={}) is None


# ------------------------------------------------------------------------------ the bank's choice

def _folder(tmp_path: Path, n: int = 6) -> Samples:
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(n // 2):
            Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(tmp_path / "data" / cls / f"{i}.png")
    cfg = DatasetConfig(name="imagefolder", source="imagefolder", root=str(tmp_path / "data"),
                        cache_dir=str(tmp_path / "cache"))
    return load_samples(OmegaConf.structured(cfg))


def _digits(tmp_path: Path) -> Samples:
    return load_samples(OmegaConf.structured(DatasetConfig(cache_dir=str(tmp_path / "cache"))))


def test_a_file_dataset_too_big_for_the_job_memory_streams_instead(tmp_path, monkeypatch, caplog):
    """The Slurm case: a cgroup limit on the job, read from its files; decoding every image on the
    host (the CPU device) would not fit half of what is left, so the loader streams them."""
    samples = _folder(tmp_path)
    resized = len(samples) * 3 * 32 * 32  # 18 KiB
    cgroup_v2(tmp_path, limit=GiB, current=GiB - resized)  # leaves 18 KiB: half of it is too little
    monkeypatch.setattr(hostmemory, "CGROUP_ROOT", str(tmp_path / "cgroup"))
    monkeypatch.setattr(hostmemory, "PROC_CGROUP", str(tmp_path / "proc_cgroup"))
    monkeypatch.delenv("SLURM_MEM_PER_NODE", raising=False)
    monkeypatch.delenv("SLURM_MEM_PER_CPU", raising=False)
    with caplog.at_level(logging.INFO, logger="proxyattention.data.bank"):
        bank = ImageBank(samples, 32, torch.device("cpu"), "auto", 64, 0)
    assert bank.mode == "files" and bank.images is None
    assert "cgroup v2 memory.max" in caplog.text and "hydra.launcher.mem_gb" in caplog.text
    roomy = ImageBank(samples, 32, torch.device("cpu"), "auto", 64, 0, host=HostMemory(4 * resized, "test"))
    assert roomy.mode == "device"
    idx = torch.tensor([5, 0, 3])
    assert torch.equal(bank.get(idx), roomy.get(idx))


def test_decoded_arrays_step_down_to_what_the_host_can_hold(tmp_path):
    samples = _digits(tmp_path)  # 8x8 arrays
    stored, resized = samples.images.nbytes, len(samples) * 3 * 32 * 32
    cpu = torch.device("cpu")

    def mode(available: int) -> str:
        return ImageBank(samples, 32, cpu, "auto", 64, 0, host=HostMemory(available, "test")).mode

    assert mode(int(resized / HOST_SHARE) + 1) == "device"
    assert mode(int(resized / HOST_SHARE) - 1) == "device-stored"
    assert mode(int(stored / HOST_SHARE) - 1) == "host"  # a view of the loaded arrays: nothing added


def test_in_memory_yes_that_the_host_cannot_hold_is_refused_in_one_line(tmp_path):
    samples = _digits(tmp_path)
    with pytest.raises(DataError) as e:
        ImageBank(samples, 32, torch.device("cpu"), "yes", None, 0, host=HostMemory(MiB, "Slurm --mem"))
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("dataset.in_memory", "dataset.max_memory_mb", "--mem", "hydra.launcher.mem_gb"):
        assert part in msg


def test_on_a_gpu_the_images_go_to_the_device_without_a_host_copy():
    """On CUDA the bank resizes and decodes chunk by chunk into device memory: the host share does not
    limit what the GPU may hold."""
    n = 10_000 * 3 * 224 * 224
    assert choose_mode(False, "auto", n, n, budget=8 * GiB, device_type="cuda", host_room=MiB) == "device"
    assert choose_mode(False, "auto", n, n, budget=8 * GiB, device_type="cpu", host_room=MiB) == "files"
    assert choose_mode(True, "auto", n, n // 49, 8 * GiB, "cpu", host_room=n // 49) == "device-stored"
    assert choose_mode(True, "no", n, n // 49, 8 * GiB, "cuda", None) == "host"


def test_resizing_arrays_in_chunks_gives_the_same_images():
    from proxyattention.data.bank import resize_array, resize_batch

    arrays = np.random.default_rng(0).integers(0, 256, (1100, 8, 8, 3), dtype=np.uint8)
    got = resize_array(arrays, 16, torch.device("cpu"))
    assert got.shape == (1100, 3, 16, 16) and got.dtype == torch.uint8
    assert torch.equal(got, resize_batch(torch.from_numpy(arrays).permute(0, 3, 1, 2), 16))


# ------------------------------------------------------------------------------ Slurm: killed for memory

def test_a_slurm_cell_killed_for_memory_says_so_and_what_to_change(tmp_path, monkeypatch):
    from launcher import cellstate, slurm_state
    from launcher.cellstate import CellState, CellStatus, error_headline
    from launcher.slurm_state import SlurmRecord, refresh_status
    from launcher.status import as_text

    sweep = tmp_path / "sweep"
    cell = Path(cellstate.cells_root(sweep)) / "abc"
    cell.mkdir(parents=True)
    log = tmp_path / "7_1_log.err"
    log.write_text("epoch 1/4 ...\nslurmstepd: error: Detected 1 oom_kill event in StepId=7.batch.\n")
    slurm_state.write_record(cell, SlurmRecord(job_id="7_1", submitted=time.time() - 3600, submitter="login:1",
                                               stdout=str(tmp_path / "out"), stderr=str(log)))
    running = CellStatus(state=CellState.RUNNING, backend="slurm", job_id="7_1")
    asked = []

    def fake_run(cmd, timeout=60.0):  # squeue no longer lists the job; sacct says how it ended
        asked.append(cmd[0])
        return "" if cmd[0] == "squeue" else "7_1|OUT_OF_MEMORY\n"

    monkeypatch.setattr(slurm_state, "_run", fake_run)
    seen = refresh_status(sweep, {"abc": running})["abc"]
    assert asked == ["squeue", "sacct"]
    assert seen.state == CellState.FAILED and not seen.interrupted
    headline = error_headline(seen.error)
    assert "OUT_OF_MEMORY" in headline and "memory limit" in headline and "hydra.launcher.mem_gb" in headline
    lines = seen.error.splitlines()
    assert "oom_kill" in seen.error  # the job's own log, for the record
    for part in ("hydra.launcher.mem_gb", "dataset.max_memory_mb", "dataset.in_memory=no"):
        assert part in lines[-1]  # last: what the status listing's error tail shows
    from launcher.manifest import CellRecord

    text = as_text(sweep, [CellRecord(id="abc", overrides=[], role="proxy", baseline=None)], {"abc": seen})
    assert "hydra.launcher.mem_gb" in text.split("errors (tail):")[1]

    # Older Slurm says FAILED for the same kill; its stderr has slurmstepd's oom_kill line.
    failed = slurm_state.view(running, slurm_state.read_record(cell), "FAILED", now=time.time())
    assert "memory limit" in error_headline(failed.error)
    log.write_text("Traceback (most recent call last):\nValueError: bad value\n")
    plain = slurm_state.view(running, slurm_state.read_record(cell), "FAILED", now=time.time())
    assert "memory" not in plain.error and error_headline(plain.error) == "ValueError: bad value"
