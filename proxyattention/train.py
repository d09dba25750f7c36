"""One trial: train a timm classifier with (or without) Proxy Attention and leave a complete record.

``python -m proxyattention.train [overrides]`` — a thin Hydra entry point around :func:`train`, the work
function that tests call directly; :func:`train` reads as the list of what a trial does. The trial folder
gets ``config.yaml``, ``checkpoint.pt`` (every epoch) and ``proxy_state.<n>.pt`` (at proxy steps; a
restarted trial resumes from them), ``progress.json`` (every epoch: how far it is, its validation
numbers), TensorBoard events under ``tb/``, ``trial.log`` and ``result.json`` — or ``error.json`` and a
non-zero exit code. A ``prune.json`` in the folder stops the trial at the next epoch boundary with a
partial ``result.json`` (``"status": "pruned"``; see :mod:`launcher.progress`).

Fairness (docs/method.md): the split is made once per (dataset, seed); data order, augmentation and initial
weights derive from the seed alone, so a proxy trial and its baseline see the same batches; OneCycleLR
steps every batch; proxies replace their originals from the very next epoch, so both runs see the
same number of images. What Proxy Attention itself does is in :mod:`proxyattention.proxy`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from launcher import fileio
from launcher import progress as progress_file
from proxyattention import checkpoint, paths
from proxyattention.config import (
    ConfigError,
    TrialConfig,
    register_configs,
    to_trial_config,
)
from proxyattention.data.bank import ImageBank
from proxyattention.data.registry import load_samples
from proxyattention.data.split import load_or_make_split
from proxyattention.data.transforms import normalize, to_float, training_input
from proxyattention.device import (
    Precision,
    configure_backends,
    device_info,
    resolve_device,
)
from proxyattention.explain import explain_trial, explain_validation
from proxyattention.identity import cell_id
from proxyattention.models import TargetLayer, build_model, find_target_layer
from proxyattention.proxy import ProxyLayer, ProxyState, proxy_step
from proxyattention.schedule import Schedule, parse_schedule, quote_schedule_overrides

log = logging.getLogger(__name__)


class TrialFailed(RuntimeError):
    """A trial run as a job of one of Hydra's own launchers failed (its folder has the error)."""


class TrialError(RuntimeError):
    """A trial that cannot go on (non-finite loss, a checkpoint from another config, …)."""


def _generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integers, independent of any other random stream."""
    g = torch.Generator()
    digest = hashlib.sha256(",".join(str(k) for k in keys).encode()).digest()
    g.manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return g


@dataclass
class Progress:
    """What a checkpoint carries besides the tensors: epochs done and what they recorded."""

    epoch: int = 0  # epochs completed
    history: list[dict[str, float]] = field(default_factory=list)
    proxy_steps: list[dict[str, float]] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=lambda: {"train_s": 0.0, "proxy_s": 0.0,
                                                             "eval_s": 0.0})
    resumed_from: Optional[int] = None


@dataclass
class Data:
    """The trial's images and its one split (CPU long index tensors)."""

    samples: Any
    split: Any
    bank: ImageBank
    train: Tensor
    val: Tensor
    test: Tensor


@dataclass
class Trial:
    """Everything a running trial holds; each step of :func:`train` takes it and moves it on."""

    cfg: Any  # TrialConfig (an OmegaConf view of it)
    out: Path
    trial_id: str
    schedule: Schedule
    device: torch.device
    precision: Precision
    channels_last: bool
    data: Data
    model: torch.nn.Module
    target_layer: TargetLayer
    batch_size: int
    steps_per_epoch: int
    optimizer: Any
    scheduler: Any
    proxies: ProxyState
    mistakes: Tensor  # (N,) int32 on the device: the class wrongly chosen per image this epoch, or -1
    progress: Progress
    writer: Any
    started: float = field(default_factory=time.time)  # when this attempt began (progress.json)
    epoch_s: list[float] = field(default_factory=list)  # wall seconds of each epoch done (progress.json)

    @property
    def seed(self) -> int:
        return int(self.cfg.train.seed)

    @property
    def epochs(self) -> int:
        return self.schedule.epochs

    @property
    def proxy_after(self) -> set[int]:
        on = self.cfg.proxy.enabled and self.schedule.has_proxy
        return set(self.schedule.proxy_after) if on else set()

    def remaining_epochs(self) -> range:
        return range(self.progress.epoch + 1, self.epochs + 1)


# ------------------------------------------------------------------------------------------ the trial

def train(cfg: DictConfig | TrialConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run (or resume) one trial in ``out_dir``; return the result written to ``result.json``.

    At every epoch boundary (and before the first epoch) a prune request in ``out_dir``
    (:mod:`launcher.progress`) stops the trial there: its partial result is written instead."""
    clock = time.perf_counter()
    trial = set_up(to_trial_config(cfg), Path(out_dir))  # device, data, model, optimizer; resume
    setup_s = time.perf_counter() - clock
    write_progress(trial)  # epoch k of N from the start (k > 0 when resumed)
    for epoch in trial.remaining_epochs():
        if (request := progress_file.prune_request(trial.out)) is not None:
            return write_pruned(trial, request, setup_s, clock)
        t0 = time.perf_counter()
        with memory_advice(trial, "training", epoch):
            row = train_epoch(trial, epoch)  # one pass over the training images, mistakes recorded
        with memory_advice(trial, "validation", epoch):
            row.update(validate(trial))
        if epoch in trial.proxy_after:
            with memory_advice(trial, "the proxy step", epoch):
                row.update(run_proxy_step(trial, epoch))  # Proxy Attention
        end_epoch(trial, epoch, row)  # log, checkpoint
        trial.epoch_s.append(time.perf_counter() - t0)
        write_progress(trial)
        progress_file.await_judgement(trial.out, epoch)  # a pruner's verdict on this epoch, when watched
    if (request := progress_file.prune_request(trial.out)) is not None:  # asked after the last epoch
        return write_pruned(trial, request, setup_s, clock)
    metrics = test_and_explain(trial)
    return write_result(trial, metrics, setup_s, clock)


# The setting that sizes each phase's batches: what an allocation failure there asks the user to lower.
PHASE_BATCH_KEYS = {"training": "train.batch_size", "validation": "train.eval_batch_size",
                    "the proxy step": "method.batch_size", "testing": "train.eval_batch_size",
                    "explainability": "explain.batch_size"}


@contextmanager
def memory_advice(trial: Trial, phase: str, epoch: Optional[int]) -> Iterator[None]:
    """Turn a failed device allocation (:func:`is_oom`) inside ``phase`` into a :class:`TrialError`
    whose one line names the phase, the setting that sizes its batches, its value and what to rerun
    with; the allocator's own message stays in ``error.json`` as the cause. Any other error passes."""
    try:
        yield
    except Exception as e:
        if not is_oom(e):
            raise
        raise TrialError(memory_advice_line(trial, phase, epoch)) from e


def memory_advice_line(trial: Trial, phase: str, epoch: Optional[int]) -> str:
    key = PHASE_BATCH_KEYS[phase]
    size = trial.batch_size if key == "train.batch_size" else int(OmegaConf.select(trial.cfg, key))
    memory = "GPU memory" if trial.device.type == "cuda" else "memory"
    at = f"epoch {epoch}" if epoch is not None else "after training"
    fix = f"{key}={max(1, size // 2)}"
    if key == "train.batch_size" and str(trial.cfg.train.batch_size) != "auto":
        fix = f"train.batch_size=auto (the largest size that fits, with headroom) or {fix}"
    return (f"out of {memory} in {phase} ({at}) at {key}={size}: rerun with {fix}; another value of it "
            f"is another cell, which starts from its first epoch")


def set_up(cfg: Any, out: Path) -> Trial:
    """Device, data, model, batch size, optimizer and schedule; resumed from a checkpoint if there is one."""
    out.mkdir(parents=True, exist_ok=True)
    trial_id = cell_id(cfg)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    precision = Precision.choose(cfg.train.amp, cfg.model.amp, device)
    configure_backends(device, cfg.train.deterministic, precision)  # before the first cuBLAS call (device.py)
    data = load_data(cfg, device)
    torch.manual_seed(int(cfg.train.seed))  # same initial weights for a proxy trial and its baseline
    model = build_model(cfg.model, len(data.samples.classes), cfg.dataset.image_size)
    target_layer = find_target_layer(model, cfg.dataset.image_size, cfg.model.target_layer)
    channels_last = use_channels_last(cfg, device)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    model.train()
    saved = checkpoint.load(out, trial_id)
    batch_size = saved["batch_size"] if saved else choose_batch_size(cfg, model, data, device, precision,
                                                                     target_layer, channels_last)
    n_train = len(data.train)
    # A last batch of one image breaks BatchNorm in train mode; it is dropped (identically in every run).
    steps_per_epoch = n_train // batch_size + (1 if n_train % batch_size > 1 else 0)
    schedule = parse_schedule(cfg.proxy.schedule, p_trains=bool(cfg.proxy.p_trains))
    # Fused AdamW on CUDA also lets the fp16 gradient scaler skip its per-step host sync.
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.max_lr / 25, weight_decay=cfg.train.weight_decay,
                                  **({"fused": True} if device.type == "cuda" else {}))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.train.max_lr,
                                                    total_steps=schedule.epochs * steps_per_epoch)
    proxies = ProxyState(cfg.proxy, cfg.dataset.image_size, device)
    progress = Progress()
    if saved:
        progress = restore(saved, model, optimizer, scheduler, precision, proxies)
        log.info("resuming from %s after epoch %d of %d", out / paths.CHECKPOINT, progress.epoch,
                 schedule.epochs)
    from torch.utils.tensorboard import SummaryWriter

    # purge_step drops events a killed attempt logged after its last checkpoint.
    writer = SummaryWriter(str(out / paths.TB_DIR), purge_step=progress.epoch + 1 if progress.epoch else None)
    mistakes = torch.full((len(data.samples),), -1, dtype=torch.int32, device=device)
    return Trial(cfg, out, trial_id, schedule, device, precision, channels_last, data, model, target_layer,
                 batch_size, steps_per_epoch, optimizer, scheduler, proxies, mistakes, progress, writer,
                 epoch_s=earlier_epoch_s(out, progress.epoch))


def earlier_epoch_s(out: Path, epochs_done: int) -> list[float]:
    """The epoch times an earlier attempt recorded in ``progress.json`` for the epochs a resumed trial
    keeps (none for a fresh trial, or when that record does not cover them)."""
    if not epochs_done:
        return []
    earlier = progress_file.read_progress(out)
    times = list(earlier["epoch_s"]) if earlier else []
    return times[:epochs_done] if len(times) >= epochs_done else []


def write_progress(trial: Trial) -> None:
    """``progress.json``: epochs done of all, their validation numbers and times (small; every epoch)."""
    p = trial.progress
    progress_file.write_progress(trial.out, epoch=p.epoch, epochs=trial.epochs, history=p.history,
                                 epoch_s=trial.epoch_s, started=trial.started, resumed_from=p.resumed_from)


def load_data(cfg: Any, device: torch.device) -> Data:
    samples = load_samples(cfg.dataset)
    split = load_or_make_split(samples, cfg.dataset, int(cfg.train.seed))
    bank = ImageBank(samples, cfg.dataset.image_size, device, cfg.dataset.in_memory,
                     cfg.dataset.max_memory_mb, cfg.dataset.num_workers)
    train_idx, val_idx, test_idx = (torch.from_numpy(a) for a in (split.train, split.val, split.test))
    log.info("%s: %d classes, %d train / %d val / %d test images", samples.name, len(samples.classes),
             len(train_idx), len(val_idx), len(test_idx))
    return Data(samples, split, bank, train_idx, val_idx, test_idx)


def use_channels_last(cfg: Any, device: torch.device) -> bool:
    """``train.channels_last``: auto = on CUDA (tensor cores want NHWC), off on the CPU."""
    value = cfg.train.channels_last
    return device.type == "cuda" if value == "auto" else bool(value)


def choose_batch_size(cfg: Any, model: torch.nn.Module, data: Data, device: torch.device,
                      precision: Precision, target_layer: TargetLayer, channels_last: bool) -> int:
    """``train.batch_size``: null = the model's, an integer, or auto (searched once, on CUDA only)."""
    bs = cfg.train.batch_size
    if bs is None:
        chosen = int(cfg.model.batch_size)
    elif bs == "auto" and device.type == "cuda":
        chosen = find_batch_size(cfg, model, target_layer, len(data.samples.classes), device, precision,
                                 channels_last, limit=max(2, len(data.train)))
        log.info("train.batch_size=auto found %d (saved in the checkpoint: a resumed trial keeps it)", chosen)
    elif bs == "auto":
        chosen = int(cfg.model.batch_size)
        log.info("train.batch_size=auto searches GPU memory; on %s using the model's %d", device.type, chosen)
    else:
        chosen = int(bs)
    return min(chosen, len(data.train))


# What CUDA's libraries say when they cannot get device memory: the caching allocator raises
# torch.OutOfMemoryError, but cuDNN and cuBLAS (a handle, a workspace) and raw CUDA calls raise a plain
# RuntimeError ("CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED", and "..._NOT_INITIALIZED"
# when creating a handle failed for want of memory).
OOM_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_NOT_INITIALIZED",
               "CUDNN_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_INITIALIZED")


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is a failed device allocation (any of :data:`OOM_MARKERS`), not a bug."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and any(marker in str(e) for marker in OOM_MARKERS)


# The batch-size headroom: the chosen size's measured peak may use at most this share of the memory the
# trial may use (see search_batch_size).
BATCH_MEMORY_SHARE = 0.9


@dataclass
class MemoryGauge:
    """What the batch-size search reads of device memory; :func:`cuda_gauge` on CUDA, a stand-in in tests.

    capacity: bytes the trial may use in all (None: unknown); peak(): bytes held at the peak since the
    last reset(), or None; reset(): release cached blocks and start a new peak; sync(): wait for the
    device, so an asynchronous failure surfaces inside the step that caused it.
    """

    capacity: Optional[int] = None
    peak: Callable[[], Optional[int]] = lambda: None
    reset: Callable[[], None] = lambda: None
    sync: Callable[[], None] = lambda: None


def cuda_gauge(device: torch.device) -> MemoryGauge:
    """Capacity: the memory free now plus what this process's allocator already holds (the model, the
    images the bank keeps on the device); the peak is the allocator's reserved peak, fragmentation
    included; memory outside the allocator (the CUDA context) is already missing from what is free."""
    free, _ = torch.cuda.mem_get_info(device)

    def reset() -> None:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    return MemoryGauge(free + torch.cuda.memory_reserved(device), lambda: torch.cuda.max_memory_reserved(device),
                       reset, lambda: torch.cuda.synchronize(device))


def search_batch_size(step: Callable[[int], None], limit: int, gauge: MemoryGauge,
                      share: float = BATCH_MEMORY_SHARE) -> int:
    """The largest batch size ``step`` runs at without running out of memory, with headroom; 0 if none.

    The thesis's doubling: try 2, 4, 8, … up to ``limit`` until a step fails with an allocation failure
    (:func:`is_oom`; any other error propagates). The rule for headroom: keep the largest power of two
    P that ran, unless its measured peak exceeded ``share`` (90%) of the memory the trial may use —
    then P / 2. Why: the doubling says only that 2P did not fit, not how close P came to the edge; the
    measured peak says that, and a size run within 10% of the edge fails later, when the allocator has
    fragmented over epochs, cuDNN's autotuner picks a larger workspace for the epoch's short last batch,
    or the proxy state has grown. With no measurement (``gauge.peak()`` None) P is kept.
    """
    best, best_peak, bs = 0, None, 2
    while bs <= limit:
        gauge.reset()
        try:
            step(bs)
            gauge.sync()
        except Exception as e:  # noqa: BLE001 (only allocation failures are caught; the rest re-raised)
            if not is_oom(e):
                raise
            log.info("train.batch_size=auto: %d does not fit (%s)", bs, str(e).strip().splitlines()[0][:200])
            break
        best, best_peak = bs, gauge.peak()
        bs *= 2
    gauge.reset()  # the failed step's blocks (freed with its exception) go back to the device
    if best > 2 and gauge.capacity and best_peak is not None and best_peak > share * gauge.capacity:
        log.info("train.batch_size=auto: %d peaked at %.0f%% of the memory the trial may use (more than "
                 "%.0f%%); keeping %d", best, 100 * best_peak / gauge.capacity, 100 * share, best // 2)
        return best // 2
    return best


class _ProbeBank:
    """The image bank as a proxy step reads it, for the batch-size probe: n random uint8 images and
    labels, already on the device."""

    def __init__(self, n: int, size: int, num_classes: int, device: torch.device, generator: torch.Generator):
        self.device = device
        self.images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=device,
                                    generator=generator)
        self.labels = torch.randint(0, num_classes, (n,), device=device, generator=generator)

    def batches(self, order: Tensor, batch_size: int):
        for idx in order.split(batch_size):
            idx_d = idx.to(self.device)
            yield idx_d, self.images[idx_d], self.labels[idx_d]


_CAM_PHASE = "proxy step (CAMs of method.batch_size images)"
_EVAL_PHASE = "evaluation (train.eval_batch_size images)"


class _BatchProbe:
    """One step of a trial at a given batch size, with everything that later needs device memory:

    1. a training step (:func:`train_batch`, the training loop's own) on a batch whose every image is a
       proxy — the in-batch proxy rebuild (:meth:`ProxyState.apply`), the augmentation, the channels-last
       copy, forward, backward and the optimizer's step (its state allocated as in the trial);
    2. a proxy step (:func:`proxy_step`, the real one) over ``method.batch_size`` images: their CAMs with
       gradients, while the last step's gradients are still held, as after an epoch;
    3. an evaluation forward of ``train.eval_batch_size`` images under no_grad.

    Every trial probes the proxy parts, its baseline too, so a proxy cell and its baseline on the same
    GPU pick the same size. ``phase`` names the part running, for the error when nothing fits.
    """

    def __init__(self, cfg: Any, model: torch.nn.Module, target_layer: TargetLayer, num_classes: int,
                 device: torch.device, precision: Precision, channels_last: bool):
        from types import SimpleNamespace

        self.cfg, self.model, self.target_layer, self.num_classes = cfg, model, target_layer, num_classes
        self.device, self.precision, self.channels_last = device, precision, channels_last
        self.size = int(cfg.dataset.image_size)
        p = cfg.proxy
        # Every mistake explained (subset 1), nothing kept for TensorBoard, one layer of state.
        self.proxy = SimpleNamespace(threshold=p.threshold, weight=p.weight, mode=p.mode, target=p.target,
                                     clear_every_step=True, subset=1.0, log_images=0)
        self.state = ProxyState(self.proxy, self.size, device)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=float(cfg.train.max_lr) / 25,
                                           **({"fused": True} if device.type == "cuda" else {}))
        self.scaler = torch.amp.GradScaler(device.type) if precision.scaler is not None else None
        self.generator = torch.Generator(device=device).manual_seed(0)
        self.phase = "training step"

    def step(self, bs: int) -> None:
        cam_bs, eval_bs = int(self.cfg.method.batch_size), int(self.cfg.train.eval_batch_size)
        bank = _ProbeBank(max(bs, cam_bs, eval_bs), self.size, self.num_classes, self.device, self.generator)
        if not self.state.layers:  # the first size: a proxy step gives the maps' shape
            self.phase = _CAM_PHASE
            self._proxy_step(bank, cam_bs)
        self.phase = "training step"
        idx = torch.arange(bs, device=self.device)
        layer = self.state.layers[-1]
        self.state.record(ProxyLayer(idx, layer.maps[idx % layer.index.numel()], layer.layer))  # all proxies
        train_batch(self.model, self.optimizer, self.precision, self.scaler, self.state, idx, bank.images[:bs],
                    bank.labels[:bs], _generator(bs), self.channels_last)
        self.phase = _CAM_PHASE
        self._proxy_step(bank, cam_bs)
        self.phase = _EVAL_PHASE
        self._evaluate(bank.images[:eval_bs])

    def _proxy_step(self, bank: _ProbeBank, n: int) -> None:
        mistakes = torch.full((bank.labels.numel(),), -1, dtype=torch.int32, device=self.device)
        mistakes[:n] = ((bank.labels[:n] + 1) % self.num_classes).to(torch.int32)
        proxy_step(self.model, bank, self.state, mistakes, self.proxy, self.cfg.method, self.target_layer,
                   torch.Generator().manual_seed(0), self.channels_last)

    def _evaluate(self, images: Tensor) -> None:
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            x = normalize(to_float(images))
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self.precision.autocast(self.device):
                self.model(x)
        self.model.train(was_training)

    def close(self) -> None:
        self.state.layers = []
        self.optimizer.state.clear()
        for p in self.model.parameters():
            p.grad = None


def find_batch_size(cfg: Any, model: torch.nn.Module, target_layer: TargetLayer, num_classes: int,
                    device: torch.device, precision: Precision, channels_last: bool, limit: int,
                    gauge: Optional[MemoryGauge] = None) -> int:
    """``train.batch_size=auto``: the largest batch the whole trial runs with, under the headroom rule of
    :func:`search_batch_size`; each size tried runs a :class:`_BatchProbe` step.

    The probe trains the trial's own model (no second copy in memory); its weights, buffers, flags and
    gradients are put back afterwards, and random numbers come from a forked stream, so the trial
    starts exactly as without the search. ``gauge``: the device's memory (default :func:`cuda_gauge`).
    """
    if gauge is None:
        gauge = cuda_gauge(device) if device.type == "cuda" else MemoryGauge()
    kept = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    training = model.training
    probe = _BatchProbe(cfg, model, target_layer, num_classes, device, precision, channels_last)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            best = search_batch_size(probe.step, limit, gauge)
    finally:
        probe.close()
        model.load_state_dict(kept)
        model.train(training)
        gauge.reset()
    if best == 0:
        fix = {"training step": "use a smaller model or dataset.image_size",
               _CAM_PHASE: "lower method.batch_size", _EVAL_PHASE: "lower train.eval_batch_size"}[probe.phase]
        raise TrialError(f"train.batch_size=auto: not even a batch of 2 fits in GPU memory (it ran out in "
                         f"the {probe.phase}); {fix}, or set train.batch_size")
    return best


# ------------------------------------------------------------------------------------------ an epoch

def epoch_order(trial: Trial, epoch: int) -> Tensor:
    """The epoch's data order (CPU long dataset indices), from the seed and epoch alone."""
    n = len(trial.data.train)
    order = trial.data.train[torch.randperm(n, generator=_generator(trial.seed, epoch, 1))]
    return order[: trial.steps_per_epoch * trial.batch_size] if n % trial.batch_size == 1 else order


def train_epoch(trial: Trial, epoch: int) -> dict[str, float]:
    """One epoch; returns ``train/loss`` and ``train/acc``.

    Proxies replace their originals before augmentation. ``trial.mistakes`` records, per image, the
    class the model wrongly chose for it in this epoch (-1 where it was right). No host–device sync per
    batch: loss and accuracy accumulate on the device and are read once at the end.
    """
    t0 = time.perf_counter()
    model, device, precision = trial.model, trial.device, trial.precision
    order = epoch_order(trial, epoch)
    aug_gen = _generator(trial.seed, epoch, 2)
    trial.mistakes.fill_(-1)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    batches = trial.data.bank.batches(order, trial.batch_size)
    if trial.cfg.train.progress and sys.stderr.isatty():
        from tqdm import tqdm
        batches = tqdm(batches, total=math.ceil(order.numel() / trial.batch_size),
                       desc=f"epoch {epoch}/{trial.epochs}", leave=False)
    for idx, imgs, labels in batches:
        logits, loss = train_batch(model, trial.optimizer, precision, precision.scaler, trial.proxies, idx, imgs,
                                   labels, aug_gen, trial.channels_last)
        trial.scheduler.step()
        pred = logits.detach().argmax(1)
        hit = pred == labels
        trial.mistakes[idx] = torch.where(hit, -1, pred).to(torch.int32)  # for the proxy step, no cost
        loss_sum += loss.detach().float() * labels.numel()
        correct += hit.sum()
    seen = max(1, order.numel())
    train_loss, train_acc = loss_sum.item() / seen, correct.item() / seen  # sync point: once per epoch
    if not math.isfinite(train_loss):
        raise TrialError(f"non-finite training loss ({train_loss}) in epoch {epoch}; lower train.max_lr "
                         "or turn off mixed precision (train.amp=false). Earlier checkpoints are kept.")
    trial.progress.timing["train_s"] += time.perf_counter() - t0
    return {"epoch": epoch, "train/loss": train_loss, "train/acc": train_acc}


def train_batch(model: torch.nn.Module, optimizer: Any, precision: Precision, scaler: Any, proxies: ProxyState,
                idx: Tensor, imgs: Tensor, labels: Tensor, aug_gen: torch.Generator,
                channels_last: bool) -> tuple[Tensor, Tensor]:
    """One optimizer step on a batch: proxies swapped in, augmented and normalised, (channels-last),
    forward, backward, step. imgs: (B, 3, S, S) uint8 of dataset indices ``idx``; returns (logits, loss).

    The training loop's step, and the one :func:`find_batch_size` measures.
    """
    x = training_input(proxies.apply(idx, imgs), aug_gen)  # augmented, normalised
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with precision.autocast(imgs.device):
        logits = model(x)
        loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    if scaler:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return logits, loss


def evaluate(trial: Trial, indices: Tensor) -> tuple[float, float]:
    """(mean loss, accuracy) on un-augmented images; the model goes back to train mode after."""
    model, device = trial.model, trial.device
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    with torch.no_grad():
        for _, imgs, labels in trial.data.bank.batches(indices, int(trial.cfg.train.eval_batch_size)):
            x = normalize(to_float(imgs))
            if trial.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with trial.precision.autocast(device):
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
            correct += (logits.argmax(1) == labels).sum()
    model.train(was_training)
    n = max(1, indices.numel())
    return loss_sum.item() / n, correct.item() / n  # one sync per evaluation


def validate(trial: Trial) -> dict[str, float]:
    t0 = time.perf_counter()
    val_loss, val_acc = evaluate(trial, trial.data.val)
    trial.progress.timing["eval_s"] += time.perf_counter() - t0
    return {"val/loss": val_loss, "val/acc": val_acc, "lr": trial.scheduler.get_last_lr()[0],
            "proxy/images": 0, "proxy/pixels_changed": 0.0, "proxy/now_correct": 0}


def run_proxy_step(trial: Trial, epoch: int) -> dict[str, float]:
    """The proxy step after ``epoch`` (:func:`proxyattention.proxy.proxy_step`), logged and saved."""
    t0 = time.perf_counter()
    cfg = trial.cfg
    dump = trial.out / "proxies" / f"after_epoch_{epoch:03d}" if cfg.proxy.dump else None
    step = proxy_step(trial.model, trial.data.bank, trial.proxies, trial.mistakes, cfg.proxy, cfg.method,
                      trial.target_layer, _generator(trial.seed, epoch, 3), trial.channels_last, dump)
    if cfg.train.checkpoint:
        checkpoint.save_proxy_state(trial.out, trial.proxies.state_dict())
    trial.progress.timing["proxy_s"] += time.perf_counter() - t0
    trial.progress.proxy_steps.append({"after_epoch": epoch, **step.stats})
    log_examples(trial.writer, step.before, step.after, epoch)
    s = step.stats
    log.info("proxy step after epoch %d: %d of %d misclassified images proxied (%d of them classified "
             "correctly by now), %.1f%% of their pixels changed", epoch, s["chosen"], s["misclassified"],
             s["now_correct"], 100 * s["pixels_changed"])
    return {"proxy/images": s["chosen"], "proxy/pixels_changed": s["pixels_changed"],
            "proxy/now_correct": s["now_correct"]}


def log_examples(writer: Any, before: Tensor, after: Tensor, step: int) -> None:
    """Originals above their proxies, as one TensorBoard image."""
    from torchvision.utils import make_grid

    k = before.shape[0]
    if k:
        writer.add_image("proxy/examples", make_grid(torch.cat([before, after]), nrow=k, padding=2), step)


def end_epoch(trial: Trial, epoch: int, row: dict[str, float]) -> None:
    """Log the epoch's numbers and write the epoch checkpoint."""
    for key, value in row.items():
        if key != "epoch":
            trial.writer.add_scalar(key, value, epoch)
    trial.writer.flush()
    trial.progress.history.append(row)
    trial.progress.epoch = epoch
    log.info("epoch %d/%d  train/loss %.4f  train/acc %.3f  val/acc %.3f", epoch, trial.epochs,
             row["train/loss"], row["train/acc"], row["val/acc"])
    if trial.cfg.train.checkpoint:
        checkpoint.save(trial.out, snapshot(trial))


# ------------------------------------------------------------------------------------------ checkpoints

def snapshot(trial: Trial) -> dict[str, Any]:
    """The epoch checkpoint's content (the proxy state is saved apart, named by its version)."""
    p = trial.progress
    return {
        "trial_id": trial.trial_id,
        "epoch": p.epoch,
        "batch_size": trial.batch_size,
        "model": trial.model.state_dict(),
        "optimizer": trial.optimizer.state_dict(),
        "scheduler": trial.scheduler.state_dict(),
        "scaler": trial.precision.scaler.state_dict() if trial.precision.scaler else {},
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "proxy_version": trial.proxies.version,
        "history": p.history,
        "proxy_steps": p.proxy_steps,
        "timing": p.timing,
    }


def restore(saved: dict[str, Any], model: torch.nn.Module, optimizer: Any, scheduler: Any,
            precision: Precision, proxies: ProxyState) -> Progress:
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if precision.scaler and saved["scaler"]:
        precision.scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["rng_cpu"])
    if saved["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng_cuda"])
    if saved["proxy_state"] is not None:
        proxies.load_state_dict(saved["proxy_state"])
    return Progress(epoch=saved["epoch"], history=list(saved["history"]), proxy_steps=list(saved["proxy_steps"]),
                    timing=dict(saved["timing"]), resumed_from=saved["epoch"])


# ------------------------------------------------------------------------------------------ the end

def test_and_explain(trial: Trial) -> dict[str, Any]:
    """Test accuracy of the final model, and its explainability metrics (``explain.*``)."""
    t0 = time.perf_counter()
    with memory_advice(trial, "testing", None):
        test_loss, test_acc = evaluate(trial, trial.data.test)
    p = trial.progress
    p.timing["eval_s"] += time.perf_counter() - t0
    trial.writer.add_scalar("test/acc", test_acc, trial.epochs)
    trial.writer.add_scalar("test/loss", test_loss, trial.epochs)
    metrics: dict[str, Any] = {"test/acc": test_acc, "test/loss": test_loss, **training_metrics(trial)}
    if trial.cfg.explain.enabled:  # explainability on test images, judged with explain.method
        t0 = time.perf_counter()
        with memory_advice(trial, "explainability", None):
            explained = explain_trial(trial.model, trial.data.bank, trial.data.test, trial.cfg, trial.target_layer,
                                      getattr(trial.data.samples, "masks", None))
        p.timing["explain_s"] = time.perf_counter() - t0
        metrics.update(explained)
        for key, value in explained.items():
            trial.writer.add_scalar(key, value, trial.epochs)
    if trial.cfg.explain.val_images > 0:  # the same metrics on validation images: val/explain/*, for a search
        t0 = time.perf_counter()
        with memory_advice(trial, "explainability", None):
            explained = explain_validation(trial.model, trial.data.bank, trial.data.val, trial.cfg,
                                           trial.target_layer, getattr(trial.data.samples, "masks", None))
        p.timing["explain_s"] = p.timing.get("explain_s", 0.0) + time.perf_counter() - t0
        metrics.update(explained)
        for key, value in explained.items():
            trial.writer.add_scalar(key, value, trial.epochs)
    return metrics


def training_metrics(trial: Trial) -> dict[str, Any]:
    """The final metrics training alone gives: the last epoch's, the best validation accuracy, proxy totals."""
    p = trial.progress
    last = p.history[-1] if p.history else {}
    images = sum(s["chosen"] for s in p.proxy_steps)
    return {
        "val/acc": last.get("val/acc", float("nan")),
        "val/acc_best": max((h["val/acc"] for h in p.history), default=float("nan")),
        "train/loss": last.get("train/loss", float("nan")),
        "train/acc": last.get("train/acc", float("nan")),
        "proxy/images": images,
        "proxy/steps": len(p.proxy_steps),
        "proxy/pixels_changed": sum(s["pixels_changed"] * s["chosen"] for s in p.proxy_steps) / max(1, images),
        "proxy/now_correct": sum(s["now_correct"] for s in p.proxy_steps),
    }


def write_pruned(trial: Trial, request: dict[str, Any], setup_s: float, clock: float) -> dict[str, Any]:
    """Stop at a prune request: ``result.json`` with ``"status": "pruned"``, the history and the training
    metrics so far (no test, no explainability: a pruned trial is not a finished result) and
    ``"pruned": {"epoch", "epochs", "reason", "requested"}``. Its checkpoint and progress stay."""
    p = trial.progress
    log.info("pruned after epoch %d of %d: %s", p.epoch, trial.epochs, request.get("reason"))
    pruned = {"epoch": p.epoch, "epochs": trial.epochs, "reason": request.get("reason"),
              "requested": request.get("requested")}
    return write_result(trial, training_metrics(trial), setup_s, clock, pruned=pruned)


def write_result(trial: Trial, metrics: dict[str, Any], setup_s: float, clock: float,
                 pruned: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    cfg = OmegaConf.to_container(trial.cfg, resolve=True)
    flat_cfg = {f"{g}.{k}": v for g, sect in cfg.items() for k, v in sect.items()
                if isinstance(v, (int, float, str, bool))}
    if pruned is None:  # a pruned trial's metrics are not final: no hparams record
        trial.writer.add_hparams(flat_cfg, {f"hparam/{k}": v for k, v in metrics.items()}, run_name="hparams")
    trial.writer.close()
    data, p = trial.data, trial.progress
    result = {
        "status": "done" if pruned is None else "pruned",
        "trial_id": trial.trial_id,
        "metrics": metrics,
        "history": p.history,
        "proxy_steps": p.proxy_steps,
        "timing": {"setup_s": setup_s, **p.timing, "total_s": time.perf_counter() - clock},
        "resumed_from_epoch": p.resumed_from,
        "data": {"name": data.samples.name, "fingerprint": data.samples.fingerprint,
                 "split": data.split.fingerprint, "classes": len(data.samples.classes),
                 "train": len(data.train), "val": len(data.val), "test": len(data.test),
                 "in_memory": data.bank.in_memory},
        "device": device_info(trial.device, trial.precision, trial.batch_size, trial.cfg.train.deterministic),
        "run": {"device": str(trial.device), "batch_size": trial.batch_size, "epochs": trial.epochs,
                "steps": trial.epochs * trial.steps_per_epoch, "channels_last": trial.channels_last,
                "amp": str(trial.precision.dtype) if trial.precision.dtype else None,
                "target_layer": trial.target_layer.name, "torch": torch.__version__,
                "proxy_state_bytes": trial.proxies.nbytes()},
        "config": cfg,
    }
    if pruned is not None:
        result["pruned"] = pruned
    fileio.write_json_atomic(trial.out / fileio.RESULT, result)
    return result


# ------------------------------------------------------------------------------------------ entry points

def _setup_logging(out: Path) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, logging.FileHandler) for h in root.handlers):
        fh = logging.FileHandler(out / paths.LOG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
    if not any(type(h) is logging.StreamHandler for h in root.handlers):
        sh = logging.StreamHandler()
        sh.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(sh)
    root.setLevel(logging.INFO)


def run_trial(cfg: DictConfig, out_dir: str | Path) -> int:
    """Validate, train, record; return the process exit code (0 done or pruned, 1 failed, 2 bad config).

    A failure leaves ``error.json`` (reason and traceback) and keeps everything written before.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _setup_logging(out)
    try:
        trial_cfg = to_trial_config(cfg)
    except Exception as e:  # ConfigError, or omegaconf's own errors for wrong keys and types
        fileio.write_error(out, e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not (out / fileio.CONFIG).exists():  # a sweep cell already has its snapshot
        fileio.write_text_atomic(out / fileio.CONFIG, OmegaConf.to_yaml(trial_cfg))
    try:
        result = train(trial_cfg, out)
    except KeyboardInterrupt:
        log.warning("interrupted; the last checkpoint in %s resumes this trial", out)
        return 130
    except ConfigError as e:  # found only on the machine (e.g. a GPU the installed torch cannot run)
        fileio.write_error(out, e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        e = worker_error(e)
        fileio.write_error(out, e)
        log.error("trial failed: %s (details in %s)", e, out / fileio.ERROR)
        return 1
    (out / fileio.ERROR).unlink(missing_ok=True)  # an earlier attempt's error no longer applies
    m = result["metrics"]
    if result["status"] == "pruned":  # stopped on request: not a failure
        pr = result["pruned"]
        print(f"pruned after epoch {pr['epoch']} of {pr['epochs']} ({pr['reason']}): val/acc_best "
              f"{m['val/acc_best']:.4f}\nresults (partial): {out / fileio.RESULT}")
        return 0
    print(f"done: test/acc {m['test/acc']:.4f}  val/acc_best {m['val/acc_best']:.4f}  "
          f"proxy/images {m['proxy/images']}  in {result['timing']['total_s']:.1f}s\n"
          f"results: {out / fileio.RESULT}\ntensorboard: tensorboard --logdir {out / paths.TB_DIR}")
    return 0


def worker_error(e: Exception) -> Exception:
    """A DataLoader worker's exception with its own message: torch re-raises it in the main process with
    "Caught X in DataLoader worker process N" and the worker's whole traceback as the message."""
    msg = str(e)
    if not (msg.startswith("Caught ") and "Original Traceback" in msg):
        return e
    last = msg.rstrip().splitlines()[-1]
    m = re.match(r"[\w.]+: (.+)", last)
    if m is None:
        return e
    try:
        clean = type(e)(m.group(1))
    except Exception:
        return e
    clean.__traceback__ = e.__traceback__
    clean.__cause__ = RuntimeError(msg)  # the worker's traceback stays in error.json
    return clean


register_configs()


def _main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from proxyattention.paths import conf_dir

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def main(cfg: DictConfig) -> None:
        from hydra.types import RunMode

        hc = HydraConfig.get()
        code = run_trial(cfg, hc.runtime.output_dir)
        if code and hc.mode == RunMode.MULTIRUN:  # a job of one of Hydra's own launchers: the sweep goes on
            raise TrialFailed(f"the trial in {hc.runtime.output_dir} failed (exit code {code}); see its "
                              f"{fileio.ERROR}")
        if code:
            sys.exit(code)

    sys.argv[1:] = quote_schedule_overrides(sys.argv[1:])
    main()


if __name__ == "__main__":
    _main()
