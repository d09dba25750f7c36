"""The GPU check: what a first run on a GPU machine must confirm before a sweep is trusted to it.

    python -m bench.gpu                 # on one GPU (H100/H200 class or V100): resnet18 at 224 px, < 8 min
    python -m bench.gpu --cpu           # the same checks on the CPU at a small size (test_resnet, 32 px)
    python -m bench.gpu --only cam,storage

Run it from the repository root. Each check prints ``CHECK <name> ok|FAIL|skip <detail>`` and its
``FIGURE`` lines; a check that crashes is a FAIL with its error in one line (the traceback goes to stderr)
and the others still run. The last line is ``N ok, M failed, K skipped``; the exit status is 1 when any
check failed. A ``skip`` (something only CUDA has) is not counted as ok.

The checks (GPU size; the ``--cpu`` stand-in where it differs):

- ``pairing``: a proxy cell (schedule ``1,p,1``) and its paired baseline have the same epoch 1 (train
  loss, validation accuracy, weights): identical with ``train.deterministic=true``; with it off the
  difference is a figure (on the CPU identical too).
- ``fp16``: fp16 autocast with a gradient scaler forced (even on a bf16 GPU): an epoch's loss, the
  validation loss and the weights finite, the model's output fp16, the scaler's scale sane.
- ``batch_auto``: a ``1,p,1`` trial with ``train.batch_size=auto`` completes; on the GPU the peak memory
  after the batch-size search stays below the device's total (CPU: the model's batch size is used).
- ``syncs``: host-device synchronisations in a training epoch (``torch.cuda.set_sync_debug_mode``):
  none per batch beyond the epoch's two reads, also with fp16 + scaler. CUDA only.
- ``memory``: peak memory per phase (train epoch, validation, proxy step, test + explain) of a real
  trial; on the GPU ``max_memory_allocated`` between resets, and what the proxy step leaves allocated;
  on the CPU the growth of the peak resident set.
- ``rebuild``: after a proxy step with ``proxy.dump=true``, the proxies rebuilt from the state (the
  trial's and the saved ``proxy_state.1.pt``) equal the dumped PNGs (within one level).
- ``cam``: native GradCAM++ on the GPU against the CPU on the same model and batch (≤ 1e-3, TF32 off;
  the TF32 default is a figure); on the CPU, native against pytorch-grad-cam (≤ 1e-4).
- ``storage``: the four image storage modes (device, device-stored, host — digits arrays; files — the
  same images as PNGs) give the same uint8 batches for the same order and the same epoch-1 train loss
  (CPU: exactly; GPU: images within one level, loss within 1e-3 relative).
- ``throughput``: the trial's training epoch (20% of the images proxies) against a bare loop of the same
  model, batch, optimizer and precision: img/s ratio ≥ 0.8 on the GPU (≥ 0.5 on the CPU, where the
  tiny model makes the per-batch augmentation weigh more).

Everything is written to a temporary folder (``PROXYATTENTION_CACHE`` points there too), removed at the
end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

# Figures: (name, value, note); the note is "target <op> <value>" or a few words.
Figure = tuple[str, float, str]
Outcome = tuple[Optional[bool], str, list[Figure]]  # ok (None: skipped), detail, figures


class Skip(Exception):
    """Raised by a check that cannot run here (e.g. CUDA only): a ``skip`` line, not counted as ok."""


# ------------------------------------------------------------------------------------------ the runner

def one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, at most ``limit`` characters."""
    text = str(e).strip().splitlines()
    msg = f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


def format_figure(name: str, value: float, note: str) -> str:
    return f"FIGURE {name} {value:.4g} ({note})"


@contextlib.contextmanager
def _torch_state_kept() -> Iterator[None]:
    """Process-wide torch settings a check (or a trial it runs) may change, put back afterwards."""
    import torch

    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    threads = torch.get_num_threads()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        torch.set_num_threads(threads)
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode(0)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_checks(checks: Sequence[tuple[str, Callable[[Any], Outcome]]], ctx: Any,
               out: Callable[[str], None] = print, state: Optional[Callable[[], Any]] = None) -> int:
    """Run every check, print its figures and its ``CHECK`` line, then the summary; return the exit code.

    A check returns ``(ok, detail, figures)``; it may raise :class:`Skip` (a skip line) or anything else
    (a FAIL line with the error in one line; the traceback goes to stderr).
    """
    counts = {"ok": 0, "FAIL": 0, "skip": 0}
    for name, fn in checks:
        t0 = time.perf_counter()
        figures: list[Figure] = []
        try:
            with (state or contextlib.nullcontext)():
                ok, detail, figures = fn(ctx)
            word = "skip" if ok is None else "ok" if ok else "FAIL"
        except Skip as e:
            word, detail = "skip", str(e)
        except Exception as e:  # noqa: BLE001 - a crash is this check's FAIL, the others still run
            traceback.print_exc(file=sys.stderr)
            word, detail = "FAIL", one_line(e)
        for fig in figures:
            out(format_figure(*fig))
        counts[word] += 1
        out(f"CHECK {name} {word} {detail} [{time.perf_counter() - t0:.1f} s]".replace("\n", " "))
    out(f"{counts['ok']} ok, {counts['FAIL']} failed, {counts['skip']} skipped")
    return 1 if counts["FAIL"] else 0


# ------------------------------------------------------------------------------------------ the set-up

@dataclass
class Ctx:
    """Where and at what size the checks run, and the temporary folder everything goes to."""

    cuda: bool
    tmp: Path
    model: str
    size: int
    batch_size: int  # model.batch_size: what its conf/model/*.yaml sets
    explain_images: int
    explain_steps: int
    fractions: tuple[float, float]  # dataset.val_fraction, dataset.test_fraction
    repeats: int
    threads: int = 0  # train.num_threads (0: torch's default)
    _n: int = field(default=0)

    @property
    def device(self):
        import torch

        return torch.device("cuda" if self.cuda else "cpu")

    def out(self, name: str) -> Path:
        """A fresh trial folder."""
        self._n += 1
        return self.tmp / "trials" / f"{self._n:02d}-{name}"

    def cfg(self, schedule: str = "2", **keys: Any) -> Any:
        """A validated trial config on the embedded digits at this size; ``keys``: dotted overrides."""
        from omegaconf import OmegaConf

        from proxyattention.config import TrialConfig, to_trial_config

        cfg = OmegaConf.structured(TrialConfig)
        base = {
            "model.name": self.model, "model.batch_size": self.batch_size, "dataset.image_size": self.size,
            "dataset.cache_dir": str(self.tmp / "cache"),
            "dataset.val_fraction": self.fractions[0], "dataset.test_fraction": self.fractions[1],
            "proxy.schedule": schedule, "train.progress": False, "train.checkpoint": False,
            "train.device": "cuda" if self.cuda else "cpu", "train.num_threads": self.threads,
            "explain.images": self.explain_images, "explain.steps": self.explain_steps,
        }
        for key, value in {**base, **keys}.items():
            OmegaConf.update(cfg, key, value, merge=False)  # an unknown key is an error
        return to_trial_config(cfg)


def gpu_ctx(tmp: Path) -> Ctx:
    return Ctx(True, tmp, "resnet18", 224, 128, 64, 10, (0.15, 0.15), 5)


def cpu_ctx(tmp: Path) -> Ctx:
    # test_resnet on 32 px digits, 10% of them for training (180 images, 3 batches): about a second an
    # epoch on 2 cores; validation and test get 808 and 809.
    return Ctx(False, tmp, "test_resnet", 32, 64, 16, 5, (0.45, 0.45), 2)


def _has_deterministic() -> bool:
    from proxyattention.config import TrainConfig

    return "deterministic" in TrainConfig.__dataclass_fields__


def _close(trial: Any) -> None:
    trial.writer.close()


def _weights(model: Any) -> dict[str, Any]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _max_weight_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    worst = 0.0
    for key, x in a.items():
        y = b[key]
        if x.is_floating_point():
            worst = max(worst, (x.double() - y.double()).abs().max().item() if x.numel() else 0.0)
        elif not bool((x == y).all()):
            worst = math.inf
    return worst


@contextlib.contextmanager
def _patched(module: Any, name: str, make: Callable[[Callable], Callable]) -> Iterator[None]:
    """Wrap ``module.name`` (a step :func:`proxyattention.train.train` looks up at call time)."""
    real = getattr(module, name)
    setattr(module, name, make(real))
    try:
        yield
    finally:
        setattr(module, name, real)


def _with_proxies(trial: Any, fraction: float = 0.2) -> None:
    """Make ``fraction`` of the training images proxies (random maps), as after a proxy step."""
    import torch

    from proxyattention.proxy import ProxyLayer

    train_idx = trial.data.train
    g = torch.Generator().manual_seed(0)
    chosen = train_idx[torch.randperm(len(train_idx), generator=g)[: int(len(train_idx) * fraction)]]
    chosen = chosen.sort().values
    maps = torch.rand(len(chosen), *trial.target_layer.map_hw, generator=g)
    trial.proxies.record(ProxyLayer(chosen, maps, True))


# ------------------------------------------------------------------------------------------ the checks

def check_pairing(ctx: Ctx) -> Outcome:
    """Epoch 1 of a proxy cell and of its paired baseline, with train.deterministic off, then on."""
    from omegaconf import OmegaConf

    from proxyattention.config import to_trial_config
    from proxyattention.identity import baseline_of
    from proxyattention.train import set_up, train_epoch, validate

    figures: list[Figure] = []
    diffs = {}
    for det in (False, True):  # off first: a setting left on by the first run cannot leak into it
        cfg = ctx.cfg("1,p,1", **{"train.deterministic": det})
        base = to_trial_config(baseline_of(OmegaConf.to_container(cfg, resolve=True)))
        assert base.proxy.schedule != cfg.proxy.schedule and not base.proxy.enabled
        runs = []
        for tag, c in (("proxy", cfg), ("baseline", base)):
            trial = set_up(c, ctx.out(f"pair-{tag}-det{int(det)}"))
            row = train_epoch(trial, 1)
            row.update(validate(trial))
            runs.append((row, _weights(trial.model)))
            _close(trial)
        (p, pw), (b, bw) = runs
        d = {"loss": abs(p["train/loss"] - b["train/loss"]), "val_acc": abs(p["val/acc"] - b["val/acc"]),
             "weights": _max_weight_diff(pw, bw)}
        diffs[det] = d
        tag = "deterministic" if det else "default"
        figures += [(f"pair_epoch1_loss_diff_{tag}", d["loss"], "target == 0" if det else "reported"),
                    (f"pair_epoch1_val_acc_diff_{tag}", d["val_acc"], "target == 0" if det else "reported"),
                    (f"pair_epoch1_weight_max_diff_{tag}", d["weights"], "target == 0" if det else "reported")]
    must = [True] if ctx.cuda else [True, False]  # the CPU is deterministic anyway
    bad = [f"{'deterministic' if det else 'default'} {k} differs by {v:.3g}"
           for det in must for k, v in diffs[det].items() if v != 0]
    if bad:
        return False, "; ".join(bad), figures
    off = diffs[False]
    return True, (f"epoch 1 of the pair identical with train.deterministic=true; with it off: loss "
                  f"{off['loss']:.2g}, val acc {off['val_acc']:.2g}, weights {off['weights']:.2g}"), figures


def check_fp16(ctx: Ctx) -> Outcome:
    """fp16 autocast + GradScaler forced on a trial, whatever the device would choose."""
    import torch

    from proxyattention.device import Precision
    from proxyattention.train import set_up, train_epoch, validate

    trial = set_up(ctx.cfg("2"), ctx.out("fp16"))
    scaler = torch.amp.GradScaler(ctx.device.type)
    trial.precision = Precision(torch.float16, scaler)
    dtypes: set[Any] = set()
    hook = trial.model.register_forward_hook(lambda m, a, out: dtypes.add(out.dtype))
    try:
        row = train_epoch(trial, 1)
        row.update(validate(trial))
    finally:
        hook.remove()
        _close(trial)
    scale = float(scaler.get_scale())
    finite = all(bool(torch.isfinite(p).all()) for p in trial.model.parameters())
    figures = [("fp16_train_loss", row["train/loss"], f"{trial.steps_per_epoch} steps, finite"),
               ("fp16_grad_scale", scale, "target in [1, 131072]")]
    problems = []
    if not math.isfinite(row["train/loss"]) or not math.isfinite(row["val/loss"]):
        problems.append(f"loss not finite (train {row['train/loss']}, val {row['val/loss']})")
    if not finite:
        problems.append("non-finite weights")
    if dtypes != {torch.float16}:
        problems.append(f"model output dtypes {sorted(map(str, dtypes))}, not float16")
    if not (math.isfinite(scale) and 1.0 <= scale <= 2.0 ** 17):
        problems.append(f"grad scale {scale}")
    if problems:
        return False, "; ".join(problems), figures
    return True, (f"{trial.steps_per_epoch} fp16 steps with GradScaler: loss {row['train/loss']:.3f}, "
                  f"val loss {row['val/loss']:.3f}, scale {scale:g}"), figures


def check_batch_auto(ctx: Ctx) -> Outcome:
    """A 1,p,1 trial with train.batch_size=auto runs to the end (train(), as a cell does)."""
    import torch

    from proxyattention import train as T

    seen: dict[str, float] = {}

    def after_search(real: Callable) -> Callable:
        def set_up(cfg: Any, out: Path) -> Any:
            if ctx.cuda:
                torch.cuda.reset_peak_memory_stats()
            trial = real(cfg, out)
            if ctx.cuda:
                torch.cuda.synchronize()
                seen["search_peak"] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()  # from here: the trial itself
            return trial
        return set_up

    with _patched(T, "set_up", after_search):
        result = T.train(ctx.cfg("1,p,1", **{"train.batch_size": "auto"}), ctx.out("batch-auto"))
    bs = int(result["run"]["batch_size"])
    figures: list[Figure] = [("auto_batch_size", bs, "the batch size train.batch_size=auto chose")]
    problems = []
    if result["status"] != "done" or len(result["history"]) != 2 or len(result["proxy_steps"]) != 1:
        problems.append(f"status {result['status']}, {len(result['history'])} epochs, "
                        f"{len(result['proxy_steps'])} proxy steps")
    detail = f"batch size {bs}, 2 epochs around a proxy step of {result['metrics']['proxy/images']} images"
    if ctx.cuda:
        torch.cuda.synchronize()
        peak, total = torch.cuda.max_memory_allocated(), torch.cuda.get_device_properties(0).total_memory
        figures += [("auto_peak_memory_gb", peak / 2**30, "after the search: epochs, proxy step, test"),
                    ("auto_peak_memory_fraction", peak / total, "target < 1"),
                    ("auto_search_peak_memory_gb", seen.get("search_peak", 0) / 2**30, "during the search")]
        if peak >= total:
            problems.append(f"peak {peak / 2**30:.1f} GiB >= total {total / 2**30:.1f} GiB")
        detail += f", peak {peak / 2**30:.1f} of {total / 2**30:.0f} GiB"
    else:
        expected = min(ctx.cfg().model.batch_size, result["data"]["train"])
        if bs != expected:
            problems.append(f"batch size {bs} on the CPU, expected the model's {expected}")
        detail += " (the model's: the search needs CUDA)"
    return (False, "; ".join(problems), figures) if problems else (True, detail, figures)


def check_syncs(ctx: Ctx) -> Outcome:
    """Host-device syncs in a training epoch: only the epoch's two reads (loss, accuracy)."""
    if not ctx.cuda:
        raise Skip("CUDA only (torch.cuda.set_sync_debug_mode)")
    import torch

    from proxyattention.device import Precision
    from proxyattention.train import set_up, train_epoch

    per_epoch = 2
    figures: list[Figure] = []
    problems, parts = [], []
    for variant in ("default", "fp16_scaler"):
        # batch 32: ~40 batches, so a sync per batch stands out from the epoch's fixed reads
        trial = set_up(ctx.cfg("4", **{"train.batch_size": 32}), ctx.out(f"syncs-{variant}"))
        if variant == "fp16_scaler":
            trial.precision = Precision(torch.float16, torch.amp.GradScaler("cuda"))
        _with_proxies(trial)
        train_epoch(trial, 1)  # warm-up: cuDNN's algorithm search, cached grids
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_epoch(trial, 2)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        batches = trial.steps_per_epoch
        _close(trial)
        extra = max(0, len(syncs) - per_epoch)
        figures += [(f"train_syncs_per_epoch_{variant}", len(syncs), f"{batches} batches"),
                    (f"train_syncs_per_batch_{variant}", extra / batches, "target == 0 beyond the 2 epoch reads")]
        where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
        parts.append(f"{variant}: {len(syncs)} in {batches} batches ({', '.join(where[:4]) or 'none'})")
        if extra > 0:
            problems.append(parts[-1])
    if problems:
        return False, "syncs beyond the epoch's reads: " + "; ".join(problems), figures
    return True, "; ".join(parts), figures


def _rss_mb() -> float:
    """The resident set now (Linux /proc), in MB; NaN where unavailable."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return math.nan


def check_memory(ctx: Ctx) -> Outcome:
    """Peak memory per phase of a real 1,p,1 trial (train(), each phase measured as it runs)."""
    import torch

    from proxyattention import train as T

    phases = {"train_epoch": "train", "validate": "validation", "run_proxy_step": "proxy_step",
              "test_and_explain": "test_explain"}
    peak: dict[str, float] = {}
    retained: dict[str, float] = {}

    def measured(phase: str) -> Callable[[Callable], Callable]:
        def make(real: Callable) -> Callable:
            def step(*args: Any, **kw: Any) -> Any:
                if ctx.cuda:
                    torch.cuda.synchronize()
                    before = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                else:
                    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
                    now = _rss_mb()
                out = real(*args, **kw)
                if ctx.cuda:
                    torch.cuda.synchronize()
                    value = torch.cuda.max_memory_allocated() / 2**20
                    retained[phase] = max(retained.get(phase, -math.inf),
                                          (torch.cuda.memory_allocated() - before) / 2**20)
                else:
                    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
                    retained[phase] = max(retained.get(phase, -math.inf), _rss_mb() - now)
                peak[phase] = max(peak.get(phase, 0.0), value)
                return out
            return step
        return make

    with contextlib.ExitStack() as stack:
        for name, phase in phases.items():
            stack.enter_context(_patched(T, name, measured(phase)))
        result = T.train(ctx.cfg("1,p,1"), ctx.out("memory"))
    missing = [p for p in phases.values() if p not in peak]
    figures: list[Figure] = []
    if ctx.cuda:
        total = torch.cuda.get_device_properties(0).total_memory / 2**20
        for phase, mb in peak.items():
            figures.append((f"gpu_peak_mb_{phase}", mb, f"max_memory_allocated; device total {total:.0f} MB"))
        figures.append(("gpu_retained_mb_proxy_step", retained.get("proxy_step", math.nan),
                        f"allocated after the step - before; {result['metrics']['proxy/images']} proxies; "
                        "target <= 64"))
    else:
        for phase, mb in peak.items():
            figures.append((f"cpu_peak_rss_growth_mb_{phase}", mb, "new high-water mark of the resident set"))
        figures.append(("cpu_rss_change_mb_proxy_step", retained.get("proxy_step", math.nan),
                        "resident set after the step - before (allocator caches included)"))
    problems = [f"phase {p} never ran" for p in missing]
    if ctx.cuda:
        problems += [f"{p} peaked at {mb:.0f} of {total:.0f} MB" for p, mb in peak.items() if mb >= 0.95 * total]
        if retained.get("proxy_step", 0) > 64:
            problems.append(f"the proxy step left {retained['proxy_step']:.0f} MB allocated")
    if problems:
        return False, "; ".join(problems), figures
    unit = "MB allocated at peak" if ctx.cuda else "MB peak-RSS growth"
    return True, ", ".join(f"{p} {mb:.0f}" for p, mb in peak.items()) + f" ({unit})", figures


def check_rebuild(ctx: Ctx) -> Outcome:
    """Proxies rebuilt from the state against the PNGs the step dumped (``proxy.dump=true``)."""
    import torch
    from torchvision.io import decode_png, read_file

    from proxyattention import checkpoint
    from proxyattention.proxy import ProxyState
    from proxyattention.train import run_proxy_step, set_up, train_epoch

    cfg = ctx.cfg("1,p,1", **{"proxy.dump": True, "train.checkpoint": True})
    out = ctx.out("rebuild")
    trial = set_up(cfg, out)
    try:
        train_epoch(trial, 1)
        stats = run_proxy_step(trial, 1)
        files = sorted((out / "proxies" / "after_epoch_001").glob("*.png"))
        if not files:
            return False, f"no PNG dumped ({stats['proxy/images']} images proxied)", []
        idx = torch.tensor([int(f.stem) for f in files])
        dumped = torch.stack([decode_png(read_file(str(f))) for f in files]).to(trial.device)
        originals = trial.data.bank.get(idx)
        idx_d = idx.to(trial.device)
        live = trial.proxies.apply(idx_d, originals)
        saved = ProxyState(cfg.proxy, cfg.dataset.image_size, trial.device)
        saved.load_state_dict(torch.load(checkpoint.proxy_state_path(out, 1), weights_only=True))
        resumed = saved.apply(idx_d, originals)
    finally:
        _close(trial)
    d_live = (live.int() - dumped.int()).abs().max().item()
    d_saved = (resumed.int() - dumped.int()).abs().max().item()
    changed = (dumped != originals).any(dim=1).float().mean().item()
    figures = [("rebuild_vs_dump_max_level_diff", d_live, "target <= 1"),
               ("rebuild_saved_state_vs_dump_max_level_diff", d_saved, "target <= 1"),
               ("rebuild_pixels_changed", changed, f"of {len(files)} proxies")]
    problems = []
    if len(files) != stats["proxy/images"]:
        problems.append(f"{len(files)} PNGs for {stats['proxy/images']} proxies")
    if d_live > 1 or d_saved > 1:
        problems.append(f"rebuilt proxies differ from the dump by up to {max(d_live, d_saved)} levels")
    if changed == 0:
        problems.append("the proxies equal their originals (nothing to compare)")
    if problems:
        return False, "; ".join(problems), figures
    return True, (f"{len(files)} proxies rebuilt (live state and saved proxy_state.1.pt) equal the dump: max "
                  f"diff {max(d_live, d_saved)} levels, {100 * changed:.1f}% of their pixels changed"), figures


def _digits_batch(size: int, n: int) -> tuple[Any, Any]:
    """(n normalised digits images at ``size`` px, random target classes), on the CPU."""
    import torch

    from omegaconf import OmegaConf

    from proxyattention.config import DatasetConfig
    from proxyattention.data.bank import resize_array
    from proxyattention.data.registry import load_samples
    from proxyattention.data.transforms import normalize, to_float

    samples = load_samples(OmegaConf.structured(DatasetConfig))
    images = normalize(to_float(resize_array(samples.images[:n], size)))
    return images, torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0))


def check_cam(ctx: Ctx) -> Outcome:
    """GradCAM++ maps: the GPU against the CPU (native path); on the CPU native against the library."""
    import torch
    from types import SimpleNamespace

    from proxyattention.cam import compute_cams
    from proxyattention.models import build_model, find_target_layer

    size = ctx.size
    torch.manual_seed(0)
    model = build_model(SimpleNamespace(name=ctx.model, pretrained=False, weights=None), 10, size).eval()
    target = find_target_layer(model, size)
    images, targets = _digits_batch(size, 32)
    if not ctx.cuda:
        native = compute_cams(model, images, targets, "gradcampp", target, impl="native", batch_size=32)
        library = compute_cams(model, images, targets, "gradcampp", target, impl="library", batch_size=32)
        diff = (native - library).abs().max().item()
        figures = [("cam_native_vs_library_max_abs_diff", diff, "target <= 1e-4")]
        return diff <= 1e-4, f"native vs pytorch-grad-cam GradCAM++ ({ctx.model}, {size} px, 32 images): " \
                             f"max |diff| {diff:.1e} (the GPU run compares GPU with CPU)", figures
    cpu = compute_cams(model, images, targets, "gradcampp", target, impl="native", batch_size=32)
    gpu_model = copy.deepcopy(model).to("cuda", memory_format=torch.channels_last)
    gpu_target = find_target_layer(gpu_model, size)
    x, t = images.to("cuda").contiguous(memory_format=torch.channels_last), targets.to("cuda")
    diffs = {}
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        for name, tf32 in (("default", flags[1]), ("fp32", False)):
            torch.backends.cudnn.allow_tf32 = tf32
            torch.backends.cuda.matmul.allow_tf32 = tf32 and flags[0]
            maps = compute_cams(gpu_model, x, t, "gradcampp", gpu_target, impl="native", batch_size=32)
            diffs[name] = (maps.cpu() - cpu).abs().max().item()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    figures = [("cam_gpu_vs_cpu_max_abs_diff", diffs["fp32"], "target <= 1e-3; TF32 off"),
               ("cam_gpu_vs_cpu_max_abs_diff_tf32_default", diffs["default"],
                f"torch's default cudnn.allow_tf32={flags[1]}, as trials run")]
    return diffs["fp32"] <= 1e-3, (f"GradCAM++ {ctx.model} {size} px, 32 images: GPU vs CPU max |diff| "
                                   f"{diffs['fp32']:.1e} (TF32 off), {diffs['default']:.1e} (torch's "
                                   "default TF32 setting)"), figures


def digit_label(path: str) -> str:
    """``dataset.label_fn`` of the PNG copy of the digits: ``<index>_<label>.png`` → label."""
    return Path(path).stem.split("_")[1]


def _write_pngs(ctx: Ctx, images: Any, labels: Any) -> Path:
    """The digits as PNG files at the input size, one flat folder in dataset order (see digit_label)."""
    from torchvision.io import write_png

    root = ctx.tmp / "digits_png"
    folder = root / "all"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels.tolist())):
        write_png(img, str(folder / f"{i:05d}_{label}.png"), compression_level=1)
    return root


def _layout(x: Any) -> str:
    import torch

    if x.is_contiguous():
        return "contiguous"
    return "channels-last" if x.is_contiguous(memory_format=torch.channels_last) else "strided"


def check_storage(ctx: Ctx) -> Outcome:
    """device, device-stored, host (digits arrays) and files (the same pixels as PNGs): same batches,
    same epoch-1 train loss."""
    import torch

    from proxyattention.data.bank import ImageBank
    from proxyattention.data.registry import load_samples
    from proxyattention.train import epoch_order, set_up, train_epoch

    det = {"train.deterministic": True} if _has_deterministic() else {}
    modes = {  # mode -> overrides that force it
        "device": {"dataset.in_memory": "yes"},
        # a 1 MiB budget: the digits at input size do not fit, at their stored 8x8 (345 KB) they do
        "device-stored": {"dataset.in_memory": "auto", "dataset.max_memory_mb": 1},
        "host": {"dataset.in_memory": "no"},
        "files": {"dataset.in_memory": "no", "dataset.source": "imagefolder", "dataset.name": "digits_png",
                  "dataset.label_fn": "bench.gpu:digit_label",
                  "dataset.num_workers": "auto" if ctx.cuda else 1},
    }
    ref_cfg = ctx.cfg("2", **modes["device"], **det)
    samples = load_samples(ref_cfg.dataset)
    bank = ImageBank(samples, ctx.size, torch.device("cpu"), "yes", None, 0)
    modes["files"]["dataset.root"] = str(_write_pngs(ctx, bank.images, bank.labels))
    del bank
    reference: Optional[dict[str, Any]] = None
    figures: list[Figure] = []
    problems, losses = [], {}
    for mode, keys in modes.items():
        trial = set_up(ctx.cfg("2", **keys, **det), ctx.out(f"storage-{mode}"))
        try:
            if trial.data.bank.mode != mode:
                problems.append(f"{mode}: the bank chose {trial.data.bank.mode}")
            order = epoch_order(trial, 1)
            batches = [imgs for _, imgs, _ in trial.data.bank.batches(order, trial.batch_size)]
            layouts = {_layout(b) for b in batches}
            images = torch.cat([b.cpu() for b in batches])
            del batches
            labels = trial.data.bank.labels[order.to(trial.device)].cpu()
            loss = train_epoch(trial, 1)["train/loss"]
        finally:
            _close(trial)
        losses[mode] = loss
        if reference is None:
            reference = {"order": order, "images": images, "labels": labels, "loss": loss, "layouts": layouts}
            continue
        if not torch.equal(order, reference["order"]) or not torch.equal(labels, reference["labels"]):
            problems.append(f"{mode}: another split, order or labels than device mode")
            continue
        level = (images.int() - reference["images"].int()).abs().max().item()
        share = (images != reference["images"]).float().mean().item()
        rel = abs(loss - reference["loss"]) / max(abs(reference["loss"]), 1e-12)
        figures += [(f"storage_{mode}_max_level_diff", level, "vs device mode; target == 0 (GPU: <= 1)"),
                    (f"storage_{mode}_loss_rel_diff", rel, "epoch-1 train loss vs device mode; target == 0 "
                                                           "(GPU: <= 1e-3)")]
        if ctx.cuda:
            if level > 1 or rel > 1e-3:
                problems.append(f"{mode}: images differ by {level} levels ({100 * share:.3f}% of values), "
                                f"loss by {rel:.1e} relative")
        elif level != 0 or loss != reference["loss"]:
            same = "the same images" if level == 0 else \
                f"images differ by {level} levels ({100 * share:.3f}% of values)"
            problems.append(f"{mode}: {same}, epoch-1 loss {loss!r} vs device mode's {reference['loss']!r}")
        if layouts != reference["layouts"]:  # the layout changes a CPU convolution's rounding
            problems.append(f"{mode}: batches {'/'.join(sorted(layouts))} in memory, device mode's "
                            f"{'/'.join(sorted(reference['layouts']))}")
    if problems:
        return False, "; ".join(problems), figures
    return True, (f"{len(modes)} modes, {len(reference['order'])} images in the same order: same uint8 "
                  f"batches, epoch-1 train loss {reference['loss']:.6f} in each"
                  + ("" if not ctx.cuda else f" (spread {max(losses.values()) - min(losses.values()):.1e})")), figures


def check_throughput(ctx: Ctx) -> Outcome:
    """The trial's train_epoch against a bare loop: same model, batch, optimizer, precision, layout."""
    import torch
    import torch.nn.functional as F

    from proxyattention.data.transforms import normalize, to_float
    from proxyattention.train import epoch_order, set_up, train_epoch

    trial = set_up(ctx.cfg("50"), ctx.out("throughput"))
    _with_proxies(trial)
    device, precision, bs = trial.device, trial.precision, trial.batch_size
    order = epoch_order(trial, 1)
    images = trial.data.bank.get(torch.arange(len(trial.data.bank.labels)))  # ready-made, on the device
    labels = trial.data.bank.labels
    model0, opt0 = copy.deepcopy(trial.model.state_dict()), copy.deepcopy(trial.optimizer.state_dict())
    sched0 = copy.deepcopy(trial.scheduler.state_dict())
    bare_model = copy.deepcopy(trial.model)
    bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=trial.cfg.train.max_lr / 25,
                                 weight_decay=trial.cfg.train.weight_decay,
                                 **({"fused": True} if device.type == "cuda" else {}))
    bare_sched = torch.optim.lr_scheduler.OneCycleLR(bare_opt, max_lr=trial.cfg.train.max_lr,
                                                     total_steps=trial.epochs * trial.steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if precision.scaler else None
    order_d = order.to(device)

    def bare_epoch() -> None:
        for idx in order_d.split(bs):
            x = normalize(to_float(images[idx]))
            if trial.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with precision.autocast(device):
                loss = F.cross_entropy(bare_model(x), labels[idx])
            bare_opt.zero_grad(set_to_none=True)
            if scaler:
                scaler.scale(loss).backward()
                scaler.step(bare_opt)
                scaler.update()
            else:
                loss.backward()
                bare_opt.step()
            bare_sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def rewind() -> None:  # every timed epoch starts from the same weights
        trial.model.load_state_dict(model0)
        trial.optimizer.load_state_dict(opt0)
        trial.scheduler.load_state_dict(sched0)
        if device.type == "cuda":
            torch.cuda.synchronize()

    ours, bare = [], []
    try:
        train_epoch(trial, 1)  # warm-up, both sides
        bare_epoch()
        for r in range(ctx.repeats):  # interleaved, so machine noise hits both alike
            rewind()
            t0 = time.perf_counter()
            train_epoch(trial, 2 + r)  # ends with the epoch's read: synchronised
            ours.append(len(order) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            bare_epoch()
            bare.append(len(order) / (time.perf_counter() - t0))
    finally:
        _close(trial)
    a, b = statistics.median(ours), statistics.median(bare)
    bound = 0.8 if ctx.cuda else 0.5
    figures = [("train_img_s", a, f"{ctx.model} {ctx.size} px, batch {bs}, {precision.name}"),
               ("bare_loop_img_s", b, "same model, batch, optimizer, precision"),
               ("train_vs_bare_ratio", a / b, f"target >= {bound}")]
    return a / b >= bound, (f"{a:.0f} vs {b:.0f} img/s ({precision.name}, batch {bs}, 20% proxies): "
                            f"ratio {a / b:.2f}"), figures


CHECKS: list[tuple[str, Callable[[Ctx], Outcome]]] = [
    ("pairing", check_pairing),  # first: train.deterministic may need to act before CUDA is used
    ("fp16", check_fp16),
    ("batch_auto", check_batch_auto),
    ("syncs", check_syncs),
    ("memory", check_memory),
    ("rebuild", check_rebuild),
    ("cam", check_cam),
    ("storage", check_storage),
    ("throughput", check_throughput),
]


# ------------------------------------------------------------------------------------------ the command

def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU at a small size (tests the script)")
    ap.add_argument("--only", default="", metavar="NAME[,NAME]", help=f"checks: {', '.join(n for n, _ in CHECKS)}")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads; default 1 with --cpu (steady on a shared machine), else torch's")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - {n for n, _ in CHECKS})
    if unknown:
        ap.error(f"--only: no check named {', '.join(unknown)}; choose from {', '.join(n for n, _ in CHECKS)}")
    checks = [(n, fn) for n, fn in CHECKS if not names or n in names]

    tmp = Path(tempfile.mkdtemp(prefix="pa-gpu-check-"))
    os.environ["PROXYATTENTION_CACHE"] = str(tmp / "cache")  # nothing reaches the user's cache
    clock = time.perf_counter()
    import torch

    try:
        if args.cpu:
            ctx = cpu_ctx(tmp)
            ctx.threads = 1 if args.threads is None else args.threads
        elif torch.cuda.is_available():
            ctx = gpu_ctx(tmp)
            ctx.threads = args.threads or 0
        else:
            print(f"CHECK cuda FAIL torch {torch.__version__} sees no CUDA device "
                  f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}); "
                  "--cpu runs the checks on the CPU")
            print("0 ok, 1 failed, 0 skipped")
            return 1
        if ctx.threads:
            torch.set_num_threads(ctx.threads)
        where = (f"{torch.cuda.get_device_name(0)} (capability "
                 f"{'.'.join(map(str, torch.cuda.get_device_capability(0)))})" if ctx.cuda
                 else f"CPU, {torch.get_num_threads()} threads")
        print(f"# {where}; torch {torch.__version__}; {ctx.model} at {ctx.size} px on digits; "
              f"train.deterministic {'present' if _has_deterministic() else 'MISSING'}; temp {tmp}", flush=True)
        code = run_checks(checks, ctx, out=lambda line: print(line, flush=True), state=_torch_state_kept)
        print(f"# {time.perf_counter() - clock:.0f} s", flush=True)
        return code
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
