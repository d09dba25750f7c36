"""The trial's input path against a plain torchvision pipeline, reading a folder of JPEG photos at 224 px.

``pipeline_ratio`` = img/s of the trial's path (``ImageBank`` streaming files through its persistent
DataLoader: decode, resize, then augmentation and normalisation on the device) ÷ img/s of a plain
``torchvision.datasets.ImageFolder`` + ``DataLoader`` doing decode + resize only, with the same number of
workers and batch size, a fresh iterator per epoch as usual. Target ≥ 1.0. The photos are 500x375 px,
the typical size of the thesis's folder datasets (Stanford Dogs; Caltech101 and Places are smaller).

``proxy_fetch_ratio`` (information): fetching the chosen images of a proxy step in chunks of 64 through
the bank's one persistent loader ÷ through a new DataLoader per chunk (how a proxy step fetched them
before).

    python -m bench.pipeline [--images 600] [--epochs 3] [--workers auto]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import figure


def make_folder(root: Path, images: int, classes: int = 10) -> None:
    """JPEGs of 500x375 px with smooth content (photo-like size and compression), ``classes`` folders."""
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 255, size=(10, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)


def trial_path(root: Path, workers: int, batch_size: int, epochs: int) -> float:
    from omegaconf import OmegaConf

    from proxyattention.config import DatasetConfig
    from proxyattention.data.bank import ImageBank
    from proxyattention.data.registry import load_samples
    from proxyattention.data.transforms import training_input

    cfg = OmegaConf.structured(DatasetConfig(name="bench", source="imagefolder", root=str(root),
                                             cache_dir=str(root.parent / "cache"), image_size=224))
    samples = load_samples(cfg)
    bank = ImageBank(samples, 224, torch.device("cpu"), "no", None, workers)
    gen = torch.Generator().manual_seed(0)
    n, t0 = 0, None
    for epoch in range(epochs + 1):  # epoch 0 warms up (the pool starts once)
        if epoch == 1:
            t0 = time.perf_counter()
        order = torch.randperm(len(samples), generator=gen)
        for _, imgs, _ in bank.batches(order, batch_size):
            training_input(imgs, gen)  # what the training loop does with a batch
            n += len(imgs) if epoch else 0
    return n / (time.perf_counter() - t0)


def plain_path(root: Path, workers: int, batch_size: int, epochs: int) -> float:
    from torchvision import datasets, transforms

    ds = datasets.ImageFolder(str(root), transform=transforms.Compose(
        [transforms.Resize((224, 224)), transforms.PILToTensor()]))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers)
    n, t0 = 0, None
    for epoch in range(epochs + 1):
        if epoch == 1:
            t0 = time.perf_counter()
        for imgs, _ in loader:
            n += len(imgs) if epoch else 0
    return n / (time.perf_counter() - t0)


def proxy_fetch(root: Path, workers: int, chosen: int) -> tuple[float, float]:
    """img/s fetching ``chosen`` images in chunks of 64: (persistent loader, a new loader per chunk)."""
    from omegaconf import OmegaConf

    from proxyattention.config import DatasetConfig
    from proxyattention.data.bank import ImageBank, _PathDataset
    from proxyattention.data.registry import load_samples

    cfg = OmegaConf.structured(DatasetConfig(name="bench", source="imagefolder", root=str(root),
                                             cache_dir=str(root.parent / "cache"), image_size=224))
    samples = load_samples(cfg)
    idx = torch.randperm(len(samples), generator=torch.Generator().manual_seed(1))[:chosen]
    bank = ImageBank(samples, 224, torch.device("cpu"), "no", None, workers)
    list(bank.batches(idx[:64], 64))  # the pool starts with the trial, not with the step
    t0 = time.perf_counter()
    for _ in bank.batches(idx, 64):
        pass
    persistent = chosen / (time.perf_counter() - t0)
    ds = _PathDataset(samples.paths, 224)
    t0 = time.perf_counter()
    for chunk in idx.split(64):
        loader = torch.utils.data.DataLoader(ds, batch_size=64, sampler=chunk.tolist(), num_workers=workers)
        for _ in loader:
            pass
    fresh = chosen / (time.perf_counter() - t0)
    return persistent, fresh


def main(argv: list[str] | None = None) -> None:
    from proxyattention.data.bank import resolve_workers

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", default="auto")
    args = ap.parse_args(argv)
    workers = max(1, resolve_workers(args.workers))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "jpegs"
        make_folder(root, args.images)
        # Side by side, alternating, so both see the same machine load; the better of two runs each.
        ours, plain = [], []
        for _ in range(2):
            ours.append(trial_path(root, workers, args.batch_size, args.epochs))
            plain.append(plain_path(root, workers, args.batch_size, args.epochs))
        print(f"{args.images} JPEGs (500x375 → 224 px), {workers} workers, batch {args.batch_size}: "
              f"trial path {max(ours):.0f} img/s (with augmentation), plain ImageFolder {max(plain):.0f} img/s")
        figure("pipeline_ratio", max(ours) / max(plain), ">=", 1.0)
        persistent, fresh = proxy_fetch(root, workers, min(args.images, 512))
        print(f"proxy-step fetch in chunks of 64: persistent loader {persistent:.0f} img/s, "
              f"a new loader per chunk {fresh:.0f} img/s")
        figure("proxy_fetch_ratio", persistent / fresh, ">=", 1.0)


if __name__ == "__main__":
    main()
