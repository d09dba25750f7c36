"""One trial: train a timm classifier with (or without) Proxy Attention and leave a complete record.

``python -m proxyattention.train [overrides]`` — a thin Hydra entry point around :func:`train`, the work
function that tests call directly; :func:`train` reads as the list of what a trial does. The trial folder
gets ``config.yaml``, ``checkpoint.pt`` (every epoch) and ``proxy_state.<n>.pt`` (at proxy steps; a
restarted trial resumes from them), TensorBoard events under ``tb/``, ``trial.log`` and ``result.json``
— or ``error.json`` and a non-zero exit code.

Fairness (DESIGN.md): the split is made once per (dataset, seed); data order, augmentation and initial
weights derive from the seed alone, so a proxy trial and its baseline see the same batches; OneCycleLR
steps every batch; proxies replace their originals from the very next epoch, so both runs see the
same number of images. What Proxy Attention itself does is in :mod:`proxyattention.proxy`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from proxyattention import checkpoint, fileio
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
from proxyattention.explain import explain_trial
from proxyattention.identity import cell_id
from proxyattention.models import TargetLayer, build_model, find_target_layer
from proxyattention.proxy import ProxyState, proxy_step
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
    """Run (or resume) one trial in ``out_dir``; return the result written to ``result.json``."""
    clock = time.perf_counter()
    trial = set_up(to_trial_config(cfg), Path(out_dir))  # device, data, model, optimizer; resume
    setup_s = time.perf_counter() - clock
    for epoch in trial.remaining_epochs():
        row = train_epoch(trial, epoch)  # one pass over the training images, mistakes recorded
        row.update(validate(trial))
        if epoch in trial.proxy_after:
            row.update(run_proxy_step(trial, epoch))  # Proxy Attention
        end_epoch(trial, epoch, row)  # log, checkpoint
    metrics = test_and_explain(trial)
    return write_result(trial, metrics, setup_s, clock)


def set_up(cfg: Any, out: Path) -> Trial:
    """Device, data, model, batch size, optimizer and schedule; resumed from a checkpoint if there is one."""
    out.mkdir(parents=True, exist_ok=True)
    trial_id = cell_id(cfg)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    configure_backends(device)
    precision = Precision.choose(cfg.train.amp and cfg.model.amp, device)
    data = load_data(cfg, device)
    torch.manual_seed(int(cfg.train.seed))  # same initial weights for a proxy trial and its baseline
    model = build_model(cfg.model, len(data.samples.classes), cfg.dataset.image_size)
    target_layer = find_target_layer(model, cfg.dataset.image_size, cfg.model.target_layer)
    channels_last = use_channels_last(cfg, device)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    model.train()
    saved = checkpoint.load(out, trial_id)
    batch_size = saved["batch_size"] if saved else choose_batch_size(cfg, model, data, device, precision)
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
        log.info("resuming from %s after epoch %d of %d", out / fileio.CHECKPOINT, progress.epoch,
                 schedule.epochs)
    from torch.utils.tensorboard import SummaryWriter

    # purge_step drops events a killed attempt logged after its last checkpoint.
    writer = SummaryWriter(str(out / fileio.TB_DIR), purge_step=progress.epoch + 1 if progress.epoch else None)
    mistakes = torch.full((len(data.samples),), -1, dtype=torch.int32, device=device)
    return Trial(cfg, out, trial_id, schedule, device, precision, channels_last, data, model, target_layer,
                 batch_size, steps_per_epoch, optimizer, scheduler, proxies, mistakes, progress, writer)


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
                      precision: Precision) -> int:
    """``train.batch_size``: null = the model's, an integer, or auto (searched once, on CUDA only)."""
    bs = cfg.train.batch_size
    if bs is None:
        chosen = int(cfg.model.batch_size)
    elif bs == "auto" and device.type == "cuda":
        chosen = find_batch_size(model, cfg.dataset.image_size, len(data.samples.classes), device, precision,
                                 limit=max(2, len(data.train)))
        log.info("train.batch_size=auto found %d (saved in the checkpoint: a resumed trial keeps it)", chosen)
    elif bs == "auto":
        chosen = int(cfg.model.batch_size)
        log.info("train.batch_size=auto searches GPU memory; on %s using the model's %d", device.type, chosen)
    else:
        chosen = int(bs)
    return min(chosen, len(data.train))


def find_batch_size(model: torch.nn.Module, image_size: int, num_classes: int, device: torch.device,
                    precision: Precision, limit: int) -> int:
    """The thesis's batch-size finder: double a random batch until a training step runs out of memory.

    Runs on a copy of the model so the trial's weights and optimizer are untouched.
    """
    probe = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(probe.parameters())
    best, bs = 0, 2
    while bs <= limit:
        try:
            x = torch.randn(bs, 3, image_size, image_size, device=device)
            y = torch.randint(0, num_classes, (bs,), device=device)
            with precision.autocast(device):
                loss = F.cross_entropy(probe(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            best, bs = bs, bs * 2
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    del probe, opt
    torch.cuda.empty_cache()
    if best == 0:
        raise TrialError("train.batch_size=auto: not even a batch of 2 fits in GPU memory; use a smaller "
                         "model or dataset.image_size")
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
        x = training_input(trial.proxies.apply(idx, imgs), aug_gen)  # augmented, normalised
        if trial.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.autocast(device):
            logits = model(x)
            loss = F.cross_entropy(logits, labels)
        trial.optimizer.zero_grad(set_to_none=True)
        if precision.scaler:
            precision.scaler.scale(loss).backward()
            precision.scaler.step(trial.optimizer)
            precision.scaler.update()
        else:
            loss.backward()
            trial.optimizer.step()
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
    test_loss, test_acc = evaluate(trial, trial.data.test)
    p = trial.progress
    p.timing["eval_s"] += time.perf_counter() - t0
    trial.writer.add_scalar("test/acc", test_acc, trial.epochs)
    trial.writer.add_scalar("test/loss", test_loss, trial.epochs)
    last = p.history[-1] if p.history else {}
    images = sum(s["chosen"] for s in p.proxy_steps)
    metrics: dict[str, Any] = {
        "test/acc": test_acc,
        "test/loss": test_loss,
        "val/acc": last.get("val/acc", float("nan")),
        "val/acc_best": max((h["val/acc"] for h in p.history), default=float("nan")),
        "train/loss": last.get("train/loss", float("nan")),
        "train/acc": last.get("train/acc", float("nan")),
        "proxy/images": images,
        "proxy/steps": len(p.proxy_steps),
        "proxy/pixels_changed": sum(s["pixels_changed"] * s["chosen"] for s in p.proxy_steps) / max(1, images),
        "proxy/now_correct": sum(s["now_correct"] for s in p.proxy_steps),
    }
    if trial.cfg.explain.enabled:  # explainability on test images, judged with explain.method
        t0 = time.perf_counter()
        explained = explain_trial(trial.model, trial.data.bank, trial.data.test, trial.cfg, trial.target_layer,
                                  getattr(trial.data.samples, "masks", None))
        p.timing["explain_s"] = time.perf_counter() - t0
        metrics.update(explained)
        for key, value in explained.items():
            trial.writer.add_scalar(key, value, trial.epochs)
    return metrics


def write_result(trial: Trial, metrics: dict[str, Any], setup_s: float, clock: float) -> dict[str, Any]:
    cfg = OmegaConf.to_container(trial.cfg, resolve=True)
    flat_cfg = {f"{g}.{k}": v for g, sect in cfg.items() for k, v in sect.items()
                if isinstance(v, (int, float, str, bool))}
    trial.writer.add_hparams(flat_cfg, {f"hparam/{k}": v for k, v in metrics.items()}, run_name="hparams")
    trial.writer.close()
    data, p = trial.data, trial.progress
    result = {
        "status": "done",
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
        "device": device_info(trial.device, trial.precision, trial.batch_size),
        "run": {"device": str(trial.device), "batch_size": trial.batch_size, "epochs": trial.epochs,
                "steps": trial.epochs * trial.steps_per_epoch, "channels_last": trial.channels_last,
                "amp": str(trial.precision.dtype) if trial.precision.dtype else None,
                "target_layer": trial.target_layer.name, "torch": torch.__version__,
                "proxy_state_bytes": trial.proxies.nbytes()},
        "config": cfg,
    }
    fileio.write_json_atomic(trial.out / fileio.RESULT, result)
    return result


# ------------------------------------------------------------------------------------------ entry points

def _setup_logging(out: Path) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, logging.FileHandler) for h in root.handlers):
        fh = logging.FileHandler(out / fileio.LOG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
    if not any(type(h) is logging.StreamHandler for h in root.handlers):
        sh = logging.StreamHandler()
        sh.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(sh)
    root.setLevel(logging.INFO)


def run_trial(cfg: DictConfig, out_dir: str | Path) -> int:
    """Validate, train, record; return the process exit code (0 done, 1 failed, 2 bad config).

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
    print(f"done: test/acc {m['test/acc']:.4f}  val/acc_best {m['val/acc_best']:.4f}  "
          f"proxy/images {m['proxy/images']}  in {result['timing']['total_s']:.1f}s\n"
          f"results: {out / fileio.RESULT}\ntensorboard: tensorboard --logdir {out / fileio.TB_DIR}")
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
