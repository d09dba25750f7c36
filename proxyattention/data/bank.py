"""Images by dataset index: decoding, resizing, and the :class:`ImageBank` the trial reads batches from.

The bank decides once where the images live (:func:`choose_mode`), from a memory budget on the device
(:func:`memory_budget`: on CUDA at most a quarter of the GPU memory free at start, and never more than
``dataset.max_memory_mb`` when set) and from the host memory the process may still take
(:func:`proxyattention.data.hostmemory.host_memory`: the cgroup or Slurm ``--mem`` limit, or what the
machine has; the bank's own host copies may take at most :data:`HOST_SHARE` of it):

- ``device``: resized to the input size and held on the device (decoded once);
- ``device-stored``: decoded arrays held on the device at their stored size and resized per batch on the
  device (CIFAR-100 at 224 px: 150 MB instead of 7.5 GB; an upscale needs no antialiasing);
- ``host``: decoded arrays in host memory at their stored size, copied per batch without blocking and
  resized on the device;
- ``files``: decoded and resized by DataLoader workers (one persistent pool, pinned memory) per batch.

Every mode yields the same uint8 (N, 3, S, S) batches; nothing in it waits on the device.

Host memory. On CUDA the images go to the device chunk by chunk (resized or decoded there), so no mode
builds a whole-dataset copy on the host; ``host`` is a view of the arrays the source loaded. On the CPU
the device *is* the host: ``device`` and ``device-stored`` are host copies and must fit the host share,
else the bank streams (``files``) or keeps the loaded arrays (``host``). ``dataset.in_memory=yes`` that
cannot fit is refused in one line naming what to change, rather than killed by the job's memory limit.
"""


from __future__ import annotations

import logging
import os
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from proxyattention.data.hostmemory import HostMemory, host_memory, mib
from proxyattention.data.samples import DataError, Samples
from proxyattention.data.transforms import to_device

log = logging.getLogger(__name__)


def open_rgb(path: str) -> Image.Image:
    """Open any image as RGB (grayscale, RGBA, palette, CMYK converted); a bad file names its path."""
    try:
        with Image.open(path) as im:
            im.load()  # the pixels stay in memory after the file is closed
            if im.mode == "RGB":
                return im
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
                return Image.alpha_composite(bg, im).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}. Remove or replace the file "
                        "(`python -m proxyattention.data verify ROOT` lists every unreadable file)") from None


def _shrinks(images: Tensor, size: int) -> bool:
    """Antialias only when shrinking: enlarging samples between pixels, where there is nothing to filter."""
    return images.shape[-1] > size or images.shape[-2] > size


def decode_resized(path: str, size: int) -> Tensor:
    """(3, size, size) uint8 tensor of the image at ``path``: decoded by Pillow, resized by torch.

    torch's uint8 bilinear resize (antialiased when shrinking) is several times faster than Pillow's
    and within one level of it; it runs in the loader's worker processes.
    """
    x = torch.from_numpy(np.array(open_rgb(path), dtype=np.uint8)).permute(2, 0, 1)
    if x.shape[-2:] == (size, size):
        return x.contiguous()
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=_shrinks(x, size))[0]


def resize_batch(images: Tensor, size: int) -> Tensor:
    """(N, 3, h, w) uint8 → (N, 3, size, size) uint8 on the same device (bilinear).

    Antialiased only when shrinking: enlarging (32 px CIFAR to 224 px) samples between pixels, where an
    antialiasing filter has nothing to remove.
    """
    if images.shape[-2:] == (size, size):
        return images.contiguous()
    y = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False,
                      antialias=_shrinks(images, size))
    return y.round_().clamp_(0, 255).to(torch.uint8)


def resize_array(images: np.ndarray, size: int, device: Optional[torch.device] = None) -> Tensor:
    """(N, H, W, 3) uint8 array → (N, 3, size, size) uint8 tensor on ``device`` (default: the CPU).

    Chunk by chunk, each resized on ``device`` and written into the result there: on a GPU no resized
    copy of the whole dataset is ever built on the host.
    """
    device = device or torch.device("cpu")
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    out = torch.empty((x.shape[0], 3, size, size), dtype=torch.uint8, device=device)
    for start in range(0, x.shape[0], 1024):
        chunk = x[start:start + 1024].to(device)
        out[start:start + chunk.shape[0]] = resize_batch(chunk, size)
    return out


def available_cpus() -> int:
    """The CPUs this cell may use: Slurm's ``cpus_per_task``, the local launcher's share of the cores
    (``PROXYATTENTION_CPUS``, its ``threads_per_cell``), else the affinity mask."""
    for var in ("SLURM_CPUS_PER_TASK", "PROXYATTENTION_CPUS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_workers(value: Any) -> int:
    """``dataset.num_workers``: an integer, or auto = one per available CPU but the training loop's (≤ 16)."""
    if value == "auto" or value is None:
        return max(0, min(16, available_cpus() - 1))
    return int(value)


def memory_budget(device: torch.device, max_memory_mb: Optional[int]) -> int:
    """Bytes of images the bank may hold on ``device``.

    ``max_memory_mb`` (when set) caps it; on CUDA it is at most a quarter of the memory free now (the
    model, its activations and the proxy state need the rest). On the CPU, without a cap, 2 GiB.
    """
    cap = None if max_memory_mb is None else int(max_memory_mb) * 2**20
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return min(free // 4, cap) if cap is not None else free // 4
    return cap if cap is not None else 2 * 2**30


HOST_SHARE = 0.5
"""The share of the host memory available to the process (:func:`host_memory`) that the bank's own host
copies may take: the rest is for everything else a trial holds on the host — the model and optimizer
on the CPU, the loader workers and their pinned batches, the CUDA context, the proxy state."""


def host_need(mode: str, device_type: str, resized: int, stored: int) -> int:
    """Bytes the bank adds to host memory in ``mode`` (see the module doc): on the CPU, ``device`` holds
    the resized images and ``device-stored`` a copy of the stored arrays; on CUDA nothing whole-dataset;
    ``host`` is a view of the loaded arrays and ``files`` streams."""
    if device_type != "cpu":
        return 0
    return {"device": resized, "device-stored": stored}.get(mode, 0)


def choose_mode(has_arrays: bool, in_memory: str, resized: int, stored: int, budget: int, device_type: str,
                host_room: Optional[int]) -> str:
    """Where the images live: ``device``, ``device-stored``, ``host`` (decoded arrays) or ``files``.

    ``resized`` / ``stored``: bytes of the whole dataset at the input size / as the source stores it;
    ``budget``: bytes the device may hold (:func:`memory_budget`); ``host_room``: bytes the bank may add
    on the host (None: no known limit). ``in_memory``: ``yes`` holds the resized images on the device
    whatever the device budget, ``auto`` the first mode that fits both budgets, ``no`` streams.
    Raises :class:`DataError` for ``yes`` when the host cannot hold what it asks for.
    """
    def fits_host(mode: str) -> bool:
        return host_room is None or host_need(mode, device_type, resized, stored) <= host_room

    if in_memory == "yes":
        if not fits_host("device"):
            raise DataError(
                f"dataset.in_memory=yes needs {mib(resized)} of host memory for the images, but this process "
                f"may add only {mib(host_room or 0)} (half of what its memory limit leaves); set "
                "dataset.in_memory=auto (holds them only when they fit; dataset.max_memory_mb caps that) "
                "or give the job more memory (Slurm --mem: hydra.launcher.mem_gb)")
        return "device"
    if in_memory == "auto":
        if resized <= budget and fits_host("device"):
            return "device"
        if has_arrays and stored <= budget and fits_host("device-stored"):
            return "device-stored"
    return "host" if has_arrays else "files"


class _PathDataset(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Tensor]:
        return i, decode_resized(self.paths[i], self.size)


class _Plan(torch.utils.data.Sampler):
    """The batches the persistent loader serves next: set before each pass, read by its main process."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ImageBank:
    """Uint8 images addressed by dataset index, on the training device (see the module doc for where)."""

    def __init__(self, samples: Samples, size: int, device: torch.device, in_memory: str = "auto",
                 max_memory_mb: Optional[int] = None, num_workers: Any = "auto",
                 host: Optional[HostMemory] = None):
        """``host``: the host memory available (default: read now, :func:`host_memory`)."""
        self.size, self.device = size, device
        self.labels = torch.from_numpy(samples.labels).to(device)
        self.num_workers = resolve_workers(num_workers)
        self.images: Optional[Tensor] = None  # device / device-stored: (N, 3, h, w) uint8 on the device
        self.host: Optional[Tensor] = None  # host: (N, h, w, 3) uint8 at the stored size
        self._loader: Optional[torch.utils.data.DataLoader] = None
        self._plan = _Plan()
        self.dataset: Optional[_PathDataset] = None
        if samples.images is None and samples.paths is None:
            raise DataError(f"dataset {samples.name} has neither images nor paths")
        budget = memory_budget(device, max_memory_mb)
        host = host if host is not None else host_memory()
        room = None if host is None else int(host.available * HOST_SHARE)
        resized = len(samples) * 3 * size * size
        arrays = samples.images is not None
        stored = samples.images.nbytes if arrays else resized
        self.mode = choose_mode(arrays, in_memory, resized, stored, budget, device.type, room)
        if arrays:
            if self.mode == "device":
                self.images = resize_array(samples.images, size, device)
            elif self.mode == "device-stored":
                self.images = torch.from_numpy(samples.images).to(device).permute(0, 3, 1, 2).contiguous()
            else:
                self.host = torch.from_numpy(samples.images)
        else:
            self.dataset = _PathDataset(samples.paths, size)
            if self.mode == "device":
                self.images = self._decode_all()
                self._loader = None  # its workers are not needed again
        held = host_need(self.mode, device.type, resized, stored)
        log.info("images: %d at %dx%d, %s (%d loader workers); host memory available: %s, the images "
                 "add %s", len(samples), size, size, self.mode, self.num_workers if self.mode == "files" else 0,
                 host.describe() if host else "unknown", mib(held))
        if in_memory == "auto" and self.mode in ("files", "host") and resized <= budget and room is not None:
            log.warning("images: %s of images would fit dataset.max_memory_mb / the device budget but not "
                        "the host memory this process may take (%s), so they are %s; give the job more "
                        "memory (Slurm --mem: hydra.launcher.mem_gb) to hold them", mib(resized),
                        host.describe(), "streamed from files" if self.mode == "files" else "kept as loaded")

    @property
    def in_memory(self) -> bool:
        return self.mode in ("device", "device-stored")

    def _loader_for(self, batches: list[list[int]]) -> torch.utils.data.DataLoader:
        """The one loader of a file-backed bank, its workers kept alive between passes."""
        self._plan.batches = batches
        if self._loader is None:
            workers = self.num_workers
            self._loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=self._plan, num_workers=workers,
                pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
                prefetch_factor=4 if workers > 0 else None)
        return self._loader

    def _decode_all(self) -> Tensor:
        """Every image decoded by the loader, written chunk by chunk straight into device memory."""
        n = len(self.dataset)
        out = torch.empty((n, 3, self.size, self.size), dtype=torch.uint8, device=self.device)
        for idx, imgs in self._loader_for([list(range(i, min(n, i + 256))) for i in range(0, n, 256)]):
            out[to_device(idx, self.device)] = imgs.to(self.device, non_blocking=True)
        return out

    def _from_arrays(self, idx_d: Tensor, idx_cpu: Optional[Tensor]) -> Tensor:
        if self.images is not None:
            return resize_batch(self.images[idx_d], self.size)  # "device": already at size
        rows = self.host[idx_cpu if idx_cpu is not None else idx_d.cpu()]
        return resize_batch(to_device(rows, self.device).permute(0, 3, 1, 2), self.size).contiguous()

    def get(self, indices: Tensor) -> Tensor:
        """Un-augmented uint8 images (len, 3, S, S) on the device for ``indices`` (long, any device; may
        be empty)."""
        if indices.numel() == 0:
            return torch.empty((0, 3, self.size, self.size), dtype=torch.uint8, device=self.device)
        if self.mode != "files":
            return self._from_arrays(indices.to(self.device), indices if indices.device.type == "cpu" else None)
        return torch.cat([imgs for _, imgs, _ in self.batches(indices.cpu(), 256)])

    def batches(self, order: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """(indices, uint8 images, labels) on the device, in ``order`` (a CPU long tensor).

        An empty ``order`` yields no batch (not one empty batch: a loader cannot collate nothing).
        """
        if order.numel() == 0:
            return
        if self.mode != "files":
            for idx in order.split(batch_size):
                idx_d = to_device(idx, self.device)
                yield idx_d, self._from_arrays(idx_d, idx), self.labels[idx_d]
            return
        plan = [chunk.tolist() for chunk in order.split(batch_size)]
        for idx, imgs in self._loader_for(plan):
            idx_d = to_device(idx, self.device)
            yield idx_d, imgs.to(self.device, non_blocking=True), self.labels[idx_d]
