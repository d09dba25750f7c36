"""Shared set-up for the benchmarks: the digits data and a model, as a trial builds them."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from omegaconf import OmegaConf

from proxyattention.config import TrialConfig
from proxyattention.data.bank import ImageBank
from proxyattention.data.registry import load_samples
from proxyattention.data.split import load_or_make_split
from proxyattention.models import build_model


def figure(name: str, value: float, op: str, target: float) -> None:
    print(f"FIGURE {name} {value:.4g} (target {op} {target})", flush=True)


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def digits_trial(model_name: str = "resnet18", image_size: int = 32, batch_size: int = 128,
                 schedule: str = "50", **proxy: object):
    """A :class:`proxyattention.train.Trial` on the embedded digits, set up exactly as ``train()`` does."""
    from proxyattention import train

    cfg = OmegaConf.structured(TrialConfig)
    cfg.model.name, cfg.dataset.image_size, cfg.train.batch_size = model_name, image_size, batch_size
    cfg.proxy.schedule, cfg.train.progress, cfg.train.checkpoint = schedule, False, False
    for key, value in proxy.items():
        cfg.proxy[key] = value
    tmp = tempfile.mkdtemp(prefix="pa-bench-")
    cfg.dataset.cache_dir = f"{tmp}/cache"
    return train.set_up(cfg, Path(tmp) / "trial")


def digits_setup(model_name: str = "resnet18", image_size: int = 32, seed: int = 0):
    """(cfg, bank, train_idx, model) for the embedded digits, exactly as ``train()`` builds them."""
    cfg = OmegaConf.structured(TrialConfig)
    cfg.model.name = model_name
    cfg.dataset.image_size = image_size
    cfg.dataset.cache_dir = tempfile.mkdtemp(prefix="pa-bench-")
    samples = load_samples(cfg.dataset)
    split = load_or_make_split(samples, cfg.dataset, seed)
    bank = ImageBank(samples, image_size, torch.device("cpu"), "yes", 2048, 0)
    torch.manual_seed(seed)
    model = build_model(cfg.model, len(samples.classes), image_size)
    return cfg, bank, torch.from_numpy(split.train), model
