"""This project's training epoch vs a minimal hand-written PyTorch loop: same model, data, batch size.

Claim: the trial's loop (device-side augmentation, proxy overlay, misclassification record, OneCycle
per batch) costs little over the bare loop — target ratio of images/s >= 0.9.

    python -m bench.train_loop [--model resnet18] [--size 32] [--epochs 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from bench.common import digits_setup, figure
from proxyattention.data import ProxyOverlay, normalize, to_float
from proxyattention.train import Precision, train_epoch


def minimal_epoch(model, images, labels, order, batch_size, optimizer, scheduler) -> None:
    for idx in order.split(batch_size):
        x = normalize(to_float(images[idx]))
        loss = F.cross_entropy(model(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg, bank, train_idx, model0 = digits_setup(args.model, args.size)
    n = train_idx.numel()
    order = train_idx[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    order = order[: n // args.batch_size * args.batch_size]  # whole batches in both loops

    def fresh():
        model = copy.deepcopy(model0).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-5)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=10 * len(order))
        return model, opt, sched

    ours, bare = [], []
    wrong = torch.zeros(len(bank.labels), dtype=torch.bool)
    overlay = ProxyOverlay(torch.device("cpu"))
    overlay.update(order[: n // 5], bank.get(order[: n // 5]))  # 20% of images carry proxies
    precision = Precision(None, None)
    fresh_model = fresh()
    minimal_epoch(*fresh_model[:1], bank.images, bank.labels, order[:256], args.batch_size,
                  *fresh_model[1:])  # warm-up
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        model, opt, sched = fresh()
        t0 = time.perf_counter()
        train_epoch(model, bank, overlay, order, args.batch_size, torch.Generator().manual_seed(1), opt, sched,
                    precision, False, wrong)
        ours.append(len(order) / (time.perf_counter() - t0))
        model, opt, sched = fresh()
        t0 = time.perf_counter()
        minimal_epoch(model, bank.images, bank.labels, order, args.batch_size, opt, sched)
        bare.append(len(order) / (time.perf_counter() - t0))
    o, b = statistics.median(ours), statistics.median(bare)
    print(f"{args.model} {args.size}px batch {args.batch_size}, {len(order)} images/epoch, "
          f"{torch.get_num_threads()} threads: ours {o:.0f} img/s, minimal {b:.0f} img/s")
    figure("train_loop_ratio", o / b, ">=", 0.9)


if __name__ == "__main__":
    main()
