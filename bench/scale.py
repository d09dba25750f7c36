"""What a trial costs at thesis scale: proxy state, a proxy step's memory, checkpoints, the input path.

Claims (targets of the V100-scale work, measured on the CPU):

- ``proxy_state_bytes_per_image`` ≤ 1,024: bytes of proxy state per proxied image, resnet18 at 224 px,
  2,000 proxied images (a uint8 proxy image is 150,528 bytes);
- ``proxy_step_memory_growth`` ≤ 1.3: peak extra memory of a proxy step with 4,000 chosen images ÷ with
  1,000 (224 px; each measured in a fresh process, sampling its resident memory during the step);
- ``checkpoint_growth`` ≤ 1.05: epoch-checkpoint bytes with 20,000 proxied images ÷ with none;
- ``pipeline_ratio`` ≥ 1.0: the trial's input path ÷ a plain torchvision ImageFolder + DataLoader
  (``bench/pipeline.py``).

    python -m bench.scale [--quick]        # --quick: fewer images (same per-image figures, faster)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.common import figure


class SyntheticBank:
    """Images made from their index on demand: a dataset of any size that costs no memory to hold."""

    def __init__(self, n: int, size: int, classes: int = 10):
        self.n, self.size, self.device = n, size, torch.device("cpu")
        self.labels = torch.arange(n) % classes

    def batches(self, order: torch.Tensor, batch_size: int):
        for idx in order.split(batch_size):
            g = torch.Generator().manual_seed(int(idx[0]) if len(idx) else 0)
            yield idx, (torch.rand(len(idx), 3, self.size, self.size, generator=g) * 255).to(torch.uint8), \
                self.labels[idx]


def _step(model_name: str, size: int, chosen: int, batch_size: int = 64):
    """(ProxyState, StepResult) of one proxy step over ``chosen`` misclassified images."""
    import timm

    from proxyattention.config import MethodConfig, ProxyConfig
    from proxyattention.models import find_target_layer
    from proxyattention.proxy import ProxyState, proxy_step

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10).eval()
    layer = find_target_layer(model, size, None)
    bank = SyntheticBank(chosen, size)
    mistakes = torch.zeros(chosen, dtype=torch.int32)  # every image wrong: all are chosen
    proxy, method = ProxyConfig(subset=1.0, log_images=8), MethodConfig(name="gradcampp", batch_size=batch_size)
    state = ProxyState(proxy, size, torch.device("cpu"))
    return state, lambda: proxy_step(model, bank, state, mistakes, proxy, method, layer, torch.Generator())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_step_memory(model_name: str, size: int, chosen: int) -> int:
    """Peak resident memory above the level just before the step, sampled every millisecond."""
    state, run = _step(model_name, size, chosen)
    base, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    run()
    done.set()
    t.join()
    return max(peak[0], _rss()) - base


def state_bytes_per_image(images: int) -> float:
    state, run = _step("resnet18", 224, images)
    run()
    return state.nbytes() / len(state)


def checkpoint_growth(proxied: int) -> float:
    """Epoch-checkpoint bytes of a real trial with ``proxied`` images in its proxy state ÷ with none."""
    from omegaconf import OmegaConf

    from proxyattention import checkpoint, train
    from proxyattention.config import TrialConfig
    from proxyattention.proxy import ProxyLayer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = OmegaConf.structured(TrialConfig)
        cfg.model.name, cfg.dataset.cache_dir, cfg.train.progress = "resnet18", f"{tmp}/cache", False
        trial = train.set_up(cfg, Path(tmp) / "t")
        checkpoint.save(trial.out, train.snapshot(trial))
        empty = (trial.out / "checkpoint.pt").stat().st_size
        index = torch.arange(proxied)
        trial.proxies.record(ProxyLayer(index, torch.rand(proxied, 7, 7), True))
        checkpoint.save_proxy_state(trial.out, trial.proxies.state_dict())
        checkpoint.save(trial.out, train.snapshot(trial))
        full = (trial.out / "checkpoint.pt").stat().st_size
        state = (trial.out / f"proxy_state.{trial.proxies.version}.pt").stat().st_size
        print(f"epoch checkpoint {empty:,} B without proxies, {full:,} B with {proxied:,}; "
              f"their state file {state:,} B")
        return full / empty


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "SIZE", "CHOSEN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    if args.child:
        print(json.dumps({"extra": measure_step_memory(args.child[0], int(args.child[1]), int(args.child[2]))}))
        return

    n = 400 if args.quick else 2000
    t0 = time.perf_counter()
    per_image = state_bytes_per_image(n)
    print(f"resnet18 224 px, {n} proxied images: {per_image:.0f} B each "
          f"(a uint8 proxy image: {3 * 224 * 224:,} B) [{time.perf_counter() - t0:.0f} s]")
    figure("proxy_state_bytes_per_image", per_image, "<=", 1024)

    small, large = (250, 1000) if args.quick else (1000, 4000)
    extras = {}
    for chosen in (small, large):
        out = subprocess.run([sys.executable, "-m", "bench.scale", "--child", "test_resnet", "224", str(chosen)],
                             capture_output=True, text=True, check=True)
        extras[chosen] = json.loads(out.stdout.strip().splitlines()[-1])["extra"]
        print(f"proxy step, {chosen} chosen images at 224 px: peak extra memory {extras[chosen] / 2**20:.0f} MiB")
    figure("proxy_step_memory_growth", extras[large] / max(1, extras[small]), "<=", 1.3)

    figure("checkpoint_growth", checkpoint_growth(20_000), "<=", 1.05)

    from bench import pipeline

    pipeline.main()


if __name__ == "__main__":
    main()
