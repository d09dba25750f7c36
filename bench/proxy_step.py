"""One proxy step vs one training epoch, with 20% of training images misclassified, subset 1.0.

Claim: a proxy step (CAM of every chosen image, the proxy maths, the overlay update) costs at most a
tenth of a training epoch — target ratio <= 0.10.

    python -m bench.proxy_step [--model resnet18] [--size 32] [--method gradcampp] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import digits_setup, figure
from proxyattention.data import ProxyOverlay
from proxyattention.models import find_target_layer
from proxyattention.train import Precision, proxy_step, train_epoch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--method", default="gradcampp")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg, bank, train_idx, model = digits_setup(args.model, args.size)
    cfg.method.name = args.method
    cfg.proxy.subset = 1.0
    target = find_target_layer(model, args.size, None)
    n = train_idx.numel()
    wrong_idx = train_idx[torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n // 5]]
    wrong = torch.zeros(len(bank.labels), dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=100 * n)
    precision = Precision(None, None)
    model.train()

    epochs, steps = [], []
    for r in range(args.repeats):
        overlay = ProxyOverlay(torch.device("cpu"))
        order = train_idx[torch.randperm(n, generator=torch.Generator().manual_seed(r))]
        t0 = time.perf_counter()
        train_epoch(model, bank, overlay, order, args.batch_size, torch.Generator().manual_seed(r), opt, sched,
                    precision, False, wrong)
        epochs.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        stats, *_ = proxy_step(model, bank, overlay, wrong_idx, cfg, target, torch.Generator().manual_seed(r),
                               False)
        steps.append(time.perf_counter() - t0)
        assert stats["images"] == len(wrong_idx)
    e, s = statistics.median(epochs), statistics.median(steps)
    print(f"{args.model} {args.size}px, {n} train images, {len(wrong_idx)} proxied with {args.method} "
          f"({cfg.method.impl}): epoch {e:.2f}s, proxy step {s:.2f}s")
    figure("proxy_step_ratio", s / e, "<=", 0.10)


if __name__ == "__main__":
    main()
