"""This project's training epoch vs a minimal hand-written PyTorch loop: same model, data, batch size.

Claim: the trial's loop (device-side augmentation, proxies rebuilt in the batch path, misclassification
record, OneCycle per batch) costs little over the bare loop — target ratio of images/s >= 0.9.

    python -m bench.train_loop [--model resnet18] [--size 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from bench.common import digits_trial, figure
from proxyattention.data.transforms import normalize, to_float
from proxyattention.proxy import ProxyLayer
from proxyattention.train import epoch_order, train_epoch


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
    trial = digits_trial(args.model, args.size, args.batch_size)
    bank = trial.data.bank
    order = epoch_order(trial, 1)
    # 20% of the training images carry proxies, rebuilt batch by batch as in a proxy trial.
    proxied = order[: len(order) // 5].sort().values
    trial.proxies.record(ProxyLayer(proxied, torch.rand(len(proxied), *trial.target_layer.map_hw), True))
    images = bank.get(torch.arange(len(bank.labels)))  # the minimal loop gets ready-made images
    model0, opt0 = copy.deepcopy(trial.model.state_dict()), copy.deepcopy(trial.optimizer.state_dict())

    def fresh():
        model = copy.deepcopy(trial.model)
        model.load_state_dict(model0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-5)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=10 * len(order))
        return model, opt, sched

    ours, bare = [], []
    m, o, s = fresh()
    minimal_epoch(m, images, bank.labels, order[:256], args.batch_size, o, s)  # warm-up
    for r in range(args.repeats):  # interleaved, so machine noise hits both alike
        trial.model.load_state_dict(model0)
        trial.optimizer.load_state_dict(opt0)
        t0 = time.perf_counter()
        train_epoch(trial, 1 + r)
        ours.append(len(order) / (time.perf_counter() - t0))
        m, o, s = fresh()
        t0 = time.perf_counter()
        minimal_epoch(m, images, bank.labels, order, args.batch_size, o, s)
        bare.append(len(order) / (time.perf_counter() - t0))
    a, b = statistics.median(ours), statistics.median(bare)
    print(f"{args.model} {args.size}px batch {args.batch_size}, {len(order)} images/epoch, "
          f"{torch.get_num_threads()} threads: ours {a:.0f} img/s, minimal {b:.0f} img/s")
    figure("train_loop_ratio", a / b, ">=", 0.9)


if __name__ == "__main__":
    main()
