"""One trial: train a timm classifier with (or without) Proxy Attention and leave a complete record.

``python -m proxyattention.train [overrides]`` — a thin Hydra entry point around :func:`train`, the work
function that tests call directly. The trial folder gets ``config.yaml``, ``checkpoint.pt`` (every
epoch; a restarted trial resumes from it), TensorBoard events under ``tb/``, ``trial.log`` and
``result.json`` — or ``error.json`` and a non-zero exit code.

Fairness (DESIGN.md): the split is made once per (dataset, seed); data order, augmentation and initial
weights derive from the seed alone, so a proxy trial and its baseline see the same batches; OneCycleLR
steps every batch; proxies replace their originals from the very next epoch, so both runs see the
same number of images.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from proxyattention import fileio as trial_io
from proxyattention.cam import compute_cams
from proxyattention.config import ConfigError, register_configs, to_trial_config
from proxyattention.identity import cell_id
from proxyattention.data import (ImageBank, ProxyOverlay, augment, load_or_make_split, load_samples,
                                 normalize, to_float)
from proxyattention.device import Precision, resolve_device
from proxyattention.explain import explain_trial
from proxyattention.models import build_model, find_target_layer
from proxyattention.proxy import changed_fraction, choose_subset, make_proxies
from proxyattention.schedule import parse_schedule, quote_schedule_overrides

log = logging.getLogger(__name__)


class TrialError(RuntimeError):
    """A trial that cannot go on (non-finite loss, a checkpoint from another config, …)."""


def _generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integers, independent of any other random stream."""
    g = torch.Generator()
    digest = hashlib.sha256(",".join(str(k) for k in keys).encode()).digest()
    g.manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return g


@dataclass
class TrialState:
    epoch: int = 0  # epochs completed
    history: list[dict[str, float]] = field(default_factory=list)
    proxy_steps: list[dict[str, float]] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=lambda: {"train_s": 0.0, "proxy_s": 0.0,
                                                             "eval_s": 0.0})
    resumed_from: Optional[int] = None


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


def _evaluate(model: torch.nn.Module, bank: ImageBank, indices: Tensor, batch_size: int,
              device: torch.device, precision: Precision, channels_last: bool) -> tuple[float, float]:
    """(mean loss, accuracy) on un-augmented images; the model goes back to train mode after."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    with torch.no_grad():
        for _, imgs, labels in bank.batches(indices, batch_size):
            x = normalize(to_float(imgs))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with precision.autocast(device):
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
            correct += (logits.argmax(1) == labels).sum()
    model.train(was_training)
    n = max(1, indices.numel())
    return loss_sum.item() / n, correct.item() / n  # one sync per evaluation


def _save_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                     precision: Precision, overlay: ProxyOverlay, state: TrialState, trial_id: str) -> None:
    ckpt = {
        "trial_id": trial_id,
        "epoch": state.epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": precision.scaler.state_dict() if precision.scaler else {},
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "overlay": overlay.state_dict(),
        "history": state.history,
        "proxy_steps": state.proxy_steps,
        "timing": state.timing,
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                     precision: Precision, overlay: ProxyOverlay, trial_id: str) -> TrialState:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt["trial_id"] != trial_id:
        raise TrialError(f"{path} belongs to a different trial config (id {ckpt['trial_id']}, this one is "
                         f"{trial_id}); use another hydra.run.dir or move that folder away")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if precision.scaler and ckpt["scaler"]:
        precision.scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng_cpu"])
    if ckpt["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
    overlay.load_state_dict(ckpt["overlay"])
    return TrialState(epoch=ckpt["epoch"], history=list(ckpt["history"]),
                      proxy_steps=list(ckpt["proxy_steps"]), timing=dict(ckpt["timing"]),
                      resumed_from=ckpt["epoch"])


def train_epoch(model: torch.nn.Module, bank: ImageBank, overlay: ProxyOverlay, order: Tensor,
                batch_size: int, aug_gen: torch.Generator, optimizer: Any, scheduler: Any,
                precision: Precision, channels_last: bool, wrong: Tensor,
                progress: Optional[str] = None) -> tuple[float, float]:
    """One epoch over ``order`` (CPU long dataset indices); returns (mean loss, accuracy).

    Proxies in ``overlay`` replace their originals before augmentation. ``wrong`` (bool, one entry per
    dataset index, on the device) is set for every image misclassified in this epoch.
    """
    device = bank.device
    wrong.zero_()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    batches = bank.batches(order, batch_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, total=math.ceil(order.numel() / batch_size), desc=progress, leave=False)
    for idx, imgs, labels in batches:
        x = normalize(augment(to_float(overlay.apply(idx, imgs)), aug_gen))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.autocast(device):
            logits = model(x)
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        if precision.scaler:
            precision.scaler.scale(loss).backward()
            precision.scaler.step(optimizer)
            precision.scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        pred = logits.detach().argmax(1)
        wrong[idx] = pred != labels  # recorded for the proxy step, at no extra cost
        loss_sum += loss.detach().float() * labels.numel()
        correct += (pred == labels).sum()
        seen += labels.numel()
    return loss_sum.item() / max(1, seen), correct.item() / max(1, seen)  # sync point: once per epoch


def proxy_step(model: torch.nn.Module, bank: ImageBank, overlay: ProxyOverlay, wrong: Tensor,
               cfg: DictConfig, target_layer: Any, generator: torch.Generator,
               channels_last: bool) -> tuple[dict[str, float], Tensor, Tensor, Tensor]:
    """Replace misclassified training images by their proxies.

    wrong: (K,) long dataset indices misclassified in the epoch just before the step.
    Returns stats and, for logging, (indices, originals, proxies) of the chosen images as uint8.
    """
    p = cfg.proxy
    chosen = choose_subset(wrong.cpu(), p.subset, generator)
    if p.clear_every_step:
        overlay.clear()
    all_idx, all_before, all_after, changed = [], [], [], []
    for idx in chosen.split(cfg.method.batch_size):
        before = overlay.apply(idx.to(bank.device), bank.get(idx))
        x = to_float(before)
        inp = normalize(x)
        if channels_last:
            inp = inp.contiguous(memory_format=torch.channels_last)
        # predicted: the class the model chooses for the un-augmented image (None = read off the CAM's
        # own forward pass).
        targets = bank.labels[idx.to(bank.device)] if p.target == "true" else None
        cams = compute_cams(model, inp, targets, cfg.method.name, target_layer, impl=cfg.method.impl,
                            batch_size=cfg.method.batch_size)
        proxies = make_proxies(x, cams, p.threshold, p.weight, p.mode)
        after = proxies.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
        changed.append(changed_fraction(before, after) * idx.numel())
        all_idx.append(idx)
        all_before.append(before)
        all_after.append(after)
    if all_idx:
        indices = torch.cat(all_idx)
        overlay.update(indices, torch.cat(all_after))
        before_t, after_t = torch.cat(all_before), torch.cat(all_after)
    else:
        indices = torch.zeros(0, dtype=torch.long)
        before_t = after_t = torch.zeros(0, 3, bank.size, bank.size, dtype=torch.uint8)
    n = int(chosen.numel())
    stats = {"misclassified": int(wrong.numel()), "images": n,
             "pixels_changed": (sum(changed) / n) if n else 0.0, "overlay_size": len(overlay)}
    return stats, indices, before_t, after_t


def _log_proxy_examples(writer: Any, before: Tensor, after: Tensor, count: int, step: int) -> None:
    from torchvision.utils import make_grid

    k = min(count, before.shape[0])
    if k == 0:
        return
    # Row 1: originals; row 2: their proxies.
    grid = make_grid(torch.cat([before[:k], after[:k]]).cpu(), nrow=k, padding=2)
    writer.add_image("proxy/examples", grid, step)


def _dump_proxies(out_dir: Path, step: int, indices: Tensor, after: Tensor) -> None:
    from torchvision.io import write_png

    folder = out_dir / "proxies" / f"after_epoch_{step:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in zip(indices.tolist(), after.cpu()):
        write_png(img, str(folder / f"{i:07d}.png"))


def train(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run (or resume) one trial in ``out_dir``; return the result written to ``result.json``."""
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = to_trial_config(cfg)
    trial_id = cell_id(cfg)
    schedule = parse_schedule(cfg.proxy.schedule)
    proxy_on = cfg.proxy.enabled and schedule.has_proxy
    proxy_after = set(schedule.proxy_after) if proxy_on else set()
    epochs = schedule.epochs
    seed = int(cfg.train.seed)

    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device)
    precision = Precision.choose(cfg.train.amp and cfg.model.amp, device)
    channels_last = bool(cfg.train.channels_last)

    samples = load_samples(cfg.dataset)
    split = load_or_make_split(samples, cfg.dataset, seed)
    bank = ImageBank(samples, cfg.dataset.image_size, device, cfg.dataset.in_memory,
                     cfg.dataset.max_memory_mb, cfg.dataset.num_workers)
    train_idx, val_idx, test_idx = (torch.from_numpy(a) for a in (split.train, split.val, split.test))
    num_classes = len(samples.classes)
    log.info("%s: %d classes, %d train / %d val / %d test images", samples.name, num_classes,
             len(train_idx), len(val_idx), len(test_idx))

    torch.manual_seed(seed)  # same initial weights for a proxy trial and its baseline
    model = build_model(cfg.model, num_classes, cfg.dataset.image_size)
    target_layer = find_target_layer(model, cfg.dataset.image_size, cfg.model.target_layer)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()

    bs = cfg.train.batch_size
    if bs is None:
        batch_size = int(cfg.model.batch_size)
    elif bs == "auto":
        if device.type == "cuda":
            batch_size = find_batch_size(model, cfg.dataset.image_size, num_classes, device, precision,
                                         limit=max(2, len(train_idx)))
            log.info("train.batch_size=auto found %d", batch_size)
        else:
            batch_size = int(cfg.model.batch_size)
            log.info("train.batch_size=auto searches GPU memory; on %s using the model's %d",
                     device.type, batch_size)
    else:
        batch_size = int(bs)
    n_train = len(train_idx)
    batch_size = min(batch_size, n_train)
    # A last batch of one image breaks BatchNorm in train mode; it is dropped (identically in every run).
    steps_per_epoch = n_train // batch_size + (1 if n_train % batch_size > 1 else 0)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.train.max_lr,
                                                    total_steps=epochs * steps_per_epoch)
    overlay = ProxyOverlay(device)
    state = TrialState()
    ckpt_path = out / trial_io.CHECKPOINT
    if ckpt_path.exists():
        state = _load_checkpoint(ckpt_path, model, optimizer, scheduler, precision, overlay, trial_id)
        log.info("resuming from %s after epoch %d of %d", ckpt_path, state.epoch, epochs)

    from torch.utils.tensorboard import SummaryWriter

    # purge_step drops events a killed attempt logged after its last checkpoint.
    writer = SummaryWriter(str(out / trial_io.TB_DIR), purge_step=state.epoch + 1 if state.epoch else None)
    setup_s = time.perf_counter() - t_start
    wrong = torch.zeros(len(samples), dtype=torch.bool, device=device)
    show_bar = bool(cfg.train.progress) and sys.stderr.isatty()

    for epoch in range(state.epoch + 1, epochs + 1):
        t0 = time.perf_counter()
        order = train_idx[torch.randperm(n_train, generator=_generator(seed, epoch, 1))]
        order = order[: steps_per_epoch * batch_size] if n_train % batch_size == 1 else order
        train_loss, train_acc = train_epoch(model, bank, overlay, order, batch_size, _generator(seed, epoch, 2),
                                            optimizer, scheduler, precision, channels_last, wrong,
                                            f"epoch {epoch}/{epochs}" if show_bar else None)
        if not math.isfinite(train_loss):
            raise TrialError(f"non-finite training loss ({train_loss}) in epoch {epoch}; lower train.max_lr "
                             "or turn off mixed precision (train.amp=false). Earlier checkpoints are kept.")
        state.timing["train_s"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        val_loss, val_acc = _evaluate(model, bank, val_idx, cfg.train.eval_batch_size, device, precision,
                                      channels_last)
        state.timing["eval_s"] += time.perf_counter() - t0
        row = {"epoch": epoch, "train/loss": train_loss, "train/acc": train_acc, "val/loss": val_loss,
               "val/acc": val_acc, "lr": scheduler.get_last_lr()[0], "proxy/images": 0,
               "proxy/pixels_changed": 0.0}

        if epoch in proxy_after:
            t0 = time.perf_counter()
            wrong_idx = wrong.nonzero().squeeze(1)
            stats, idx, before, after = proxy_step(model, bank, overlay, wrong_idx, cfg, target_layer,
                                                   _generator(seed, epoch, 3), channels_last)
            state.timing["proxy_s"] += time.perf_counter() - t0
            state.proxy_steps.append({"after_epoch": epoch, **stats})
            row["proxy/images"], row["proxy/pixels_changed"] = stats["images"], stats["pixels_changed"]
            _log_proxy_examples(writer, before, after, cfg.proxy.log_images, epoch)
            if cfg.proxy.dump:
                _dump_proxies(out, epoch, idx, after)
            log.info("proxy step after epoch %d: %d of %d misclassified images proxied, %.1f%% of their "
                     "pixels changed", epoch, stats["images"], stats["misclassified"],
                     100 * stats["pixels_changed"])

        for key, value in row.items():
            if key != "epoch":
                writer.add_scalar(key, value, epoch)
        writer.flush()
        state.history.append(row)
        state.epoch = epoch
        log.info("epoch %d/%d  train/loss %.4f  train/acc %.3f  val/acc %.3f", epoch, epochs, train_loss,
                 train_acc, val_acc)
        if cfg.train.checkpoint:
            _save_checkpoint(ckpt_path, model, optimizer, scheduler, precision, overlay, state, trial_id)

    t0 = time.perf_counter()
    test_loss, test_acc = _evaluate(model, bank, test_idx, cfg.train.eval_batch_size, device, precision,
                                    channels_last)
    state.timing["eval_s"] += time.perf_counter() - t0
    writer.add_scalar("test/acc", test_acc, epochs)
    writer.add_scalar("test/loss", test_loss, epochs)

    last = state.history[-1] if state.history else {}
    metrics = {
        "test/acc": test_acc,
        "test/loss": test_loss,
        "val/acc": last.get("val/acc", float("nan")),
        "val/acc_best": max((h["val/acc"] for h in state.history), default=float("nan")),
        "train/loss": last.get("train/loss", float("nan")),
        "train/acc": last.get("train/acc", float("nan")),
        "proxy/images": sum(s["images"] for s in state.proxy_steps),
        "proxy/steps": len(state.proxy_steps),
        "proxy/pixels_changed": (sum(s["pixels_changed"] * s["images"] for s in state.proxy_steps)
                                 / max(1, sum(s["images"] for s in state.proxy_steps))),
    }
    if cfg.explain.enabled:  # explainability on test images, judged with explain.method
        t0 = time.perf_counter()
        explained = explain_trial(model, bank, test_idx, cfg, target_layer, getattr(samples, "masks", None))
        state.timing["explain_s"] = time.perf_counter() - t0
        metrics.update(explained)
        for key, value in explained.items():
            writer.add_scalar(key, value, epochs)
    flat_cfg = {f"{g}.{k}": v for g, sect in OmegaConf.to_container(cfg, resolve=True).items()
                for k, v in sect.items() if isinstance(v, (int, float, str, bool))}
    writer.add_hparams(flat_cfg, {f"hparam/{k}": v for k, v in metrics.items()}, run_name="hparams")
    writer.close()

    timing = {"setup_s": setup_s, **state.timing, "total_s": time.perf_counter() - t_start}
    result = {
        "status": "done",
        "trial_id": trial_id,
        "metrics": metrics,
        "history": state.history,
        "proxy_steps": state.proxy_steps,
        "timing": timing,
        "resumed_from_epoch": state.resumed_from,
        "data": {"name": samples.name, "fingerprint": samples.fingerprint, "split": split.fingerprint,
                 "classes": num_classes, "train": len(train_idx), "val": len(val_idx),
                 "test": len(test_idx), "in_memory": bank.in_memory},
        "run": {"device": str(device), "batch_size": batch_size, "epochs": epochs,
                "amp": str(precision.dtype) if precision.dtype else None, "target_layer": target_layer.name,
                "torch": torch.__version__},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    trial_io.write_json_atomic(out / trial_io.RESULT, result)
    return result


def _setup_logging(out: Path) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, logging.FileHandler) for h in root.handlers):
        fh = logging.FileHandler(out / trial_io.LOG)
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
        trial_io.write_error(out, e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not (out / trial_io.CONFIG).exists():  # a sweep cell already has its snapshot
        (out / trial_io.CONFIG).write_text(OmegaConf.to_yaml(trial_cfg))
    try:
        result = train(trial_cfg, out)
    except KeyboardInterrupt:
        log.warning("interrupted; the last checkpoint in %s resumes this trial", out)
        return 130
    except Exception as e:
        trial_io.write_error(out, e)
        log.error("trial failed: %s (details in %s)", e, out / trial_io.ERROR)
        return 1
    (out / trial_io.ERROR).unlink(missing_ok=True)  # an earlier attempt's error no longer applies
    m = result["metrics"]
    print(f"done: test/acc {m['test/acc']:.4f}  val/acc_best {m['val/acc_best']:.4f}  "
          f"proxy/images {m['proxy/images']}  in {result['timing']['total_s']:.1f}s\n"
          f"results: {out / trial_io.RESULT}\ntensorboard: tensorboard --logdir {out / trial_io.TB_DIR}")
    return 0


register_configs()


def _main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    conf_dir = str(Path(__file__).resolve().parent.parent / "conf")

    @hydra.main(config_path=conf_dir, config_name="config", version_base="1.3")
    def main(cfg: DictConfig) -> None:
        code = run_trial(cfg, HydraConfig.get().runtime.output_dir)
        if code:
            sys.exit(code)

    sys.argv[1:] = quote_schedule_overrides(sys.argv[1:])
    main()


if __name__ == "__main__":
    _main()
