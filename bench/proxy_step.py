"""One proxy step vs one training epoch, with 20% of training images misclassified, subset 1.0.

Claim: a proxy step (CAM of every chosen image, the proxy maths, recording the state) costs at most a
tenth of a training epoch — target ratio <= 0.10.

    python -m bench.proxy_step [--model resnet18] [--size 32] [--method gradcampp] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import digits_trial, figure
from proxyattention.proxy import ProxyState, proxy_step
from proxyattention.train import train_epoch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--method", default="gradcampp")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    trial = digits_trial(args.model, args.size, args.batch_size, subset=1.0)
    cfg = trial.cfg
    cfg.method.name = args.method
    train_idx = trial.data.train
    n = train_idx.numel()
    wrong = train_idx[torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n // 5]]
    epochs, steps = [], []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        train_epoch(trial, 1 + r)
        epochs.append(time.perf_counter() - t0)
        mistakes = torch.full_like(trial.mistakes, -1)
        mistakes[wrong] = 0
        state = ProxyState(cfg.proxy, cfg.dataset.image_size, trial.device)
        t0 = time.perf_counter()
        step = proxy_step(trial.model, trial.data.bank, state, mistakes, cfg.proxy, cfg.method,
                          trial.target_layer, torch.Generator().manual_seed(r), trial.channels_last)
        steps.append(time.perf_counter() - t0)
        assert step.stats["chosen"] == len(wrong)
    e, s = statistics.median(epochs), statistics.median(steps)
    print(f"{args.model} {args.size}px, {n} train images, {len(wrong)} proxied with {args.method} "
          f"({cfg.method.impl}): epoch {e:.2f}s, proxy step {s:.2f}s")
    figure("proxy_step_ratio", s / e, "<=", 0.10)


if __name__ == "__main__":
    main()
