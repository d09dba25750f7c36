"""Proxy Attention: the proxy step, its state and its maths — everything the method adds to training.

At each ``p`` of the schedule (``proxy.schedule``), the training images the model misclassified in the
epoch just before (recorded while training, at no extra cost) are explained with a CAM
(``method.name``), and the pixels the model attended to (``cam >= proxy.threshold``) are down-weighted:
the *proxy image* replaces its original for the following epochs, so a proxy run sees exactly as many
images as its baseline. Everything is in pixel space, before ImageNet normalisation.

State. A proxy is a pure function of its original image and its CAM, so :class:`ProxyState` keeps per
proxied image only the CAM at the target layer's resolution (7x7 float32 = 196 bytes for resnet18 at
224 px, against 147 KiB for the proxy image itself) and rebuilds proxies on the device, batch by batch,
inside the training loop (:meth:`ProxyState.apply`). With ``proxy.clear_every_step=false`` proxies
persist and a later step explains the current (already proxied) image: the state is then the chain of
steps, replayed in order. Rebuilt proxies are the ones the step computed, to the bit: the same CAM
post-processing (:func:`proxyattention.cam.to_input_size`) and the same uint8 rounding.

Methods that exist only in pytorch-grad-cam (``scorecam``, ``ablationcam``, …) give maps at input
resolution only; their state keeps that map as float16 (2 bytes a pixel).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from proxyattention.cam import explain_batch, to_input_size
from proxyattention.config import MethodConfig, ProxyConfig
from proxyattention.data.transforms import normalize, to_float

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ the maths

def make_proxies(images: Tensor, cams: Tensor, threshold: float, weight: float, mode: str) -> Tensor:
    """Proxy images.

    images: (N, C, H, W) float in [0, 1]; cams: (N, H, W) float in [0, 1], min–max normalised per image.
    On pixels where ``cam >= threshold`` (all channels) — the maximum is exactly 1, so ``threshold=1``
    selects the most attended pixels; a constant map (all zeros: it says nothing) selects none, whatever
    the threshold:

    - ``blend``: ``x * (1 - weight * cam)``;
    - ``mean`` / ``max`` / ``min``: the image's own per-channel mean / max / min;
    - ``black`` / ``white``: 0 / 1.

    Returns (N, C, H, W) float in [0, 1]; pixels below the threshold are untouched.
    """
    if images.ndim != 4 or cams.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"images (N,C,H,W) and cams (N,H,W) must match; got {tuple(images.shape)} "
                         f"and {tuple(cams.shape)}")
    cam = cams.to(images.dtype).unsqueeze(1)  # (N, 1, H, W), broadcast over channels
    informative = cams.flatten(1).amax(1) > 0
    mask = (cam >= threshold) & informative[:, None, None, None]
    if mode == "blend":
        fill = images * (1.0 - weight * cam)
    elif mode in ("mean", "max", "min"):
        flat = images.flatten(2)  # (N, C, H*W)
        stat = {"mean": flat.mean(2), "max": flat.amax(2), "min": flat.amin(2)}[mode]
        fill = stat[:, :, None, None].expand_as(images)
    elif mode == "black":
        fill = torch.zeros_like(images)
    elif mode == "white":
        fill = torch.ones_like(images)
    else:
        raise ValueError(f"proxy.mode={mode!r} is not one of blend, mean, max, min, black, white")
    return torch.where(mask, fill, images)


def to_uint8(images: Tensor) -> Tensor:
    """(N, C, H, W) float in [0, 1] → uint8, rounded: how a proxy is stored and seen, like an image file."""
    return images.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def changed_fraction(images: Tensor, proxies: Tensor) -> float:
    """Fraction of pixels (over all images, any channel) whose value the proxy changed."""
    if images.numel() == 0:
        return 0.0
    return (images != proxies).any(dim=1).float().mean().item()


def choose_subset(indices: Tensor, fraction: float, generator: torch.Generator) -> Tensor:
    """A seeded random ``fraction`` of ``indices`` (at least one when any), returned sorted.

    indices: (M,) long. ``generator`` is a CPU generator so the choice is the same on every device.
    """
    m = indices.numel()
    if m == 0 or fraction >= 1.0:
        return indices.sort().values
    k = max(1, math.floor(fraction * m + 0.5))
    perm = torch.randperm(m, generator=generator)[:k]
    return indices[perm.to(indices.device)].sort().values


# ------------------------------------------------------------------------------------------ the state

@dataclass
class ProxyLayer:
    """One proxy step's record: which images it proxied and the CAM that rebuilds each proxy.

    index: (K,) long, sorted dataset indices. maps: (K, h, w) float32 raw target-layer maps
    (``layer=True``), or (K, H, W) float16 input-resolution maps in [0, 1] (library-only methods).
    """

    index: Tensor
    maps: Tensor
    layer: bool

    def nbytes(self) -> int:
        return self.index.numel() * self.index.element_size() + self.maps.numel() * self.maps.element_size()


class ProxyState:
    """Which training images are proxies now, and how to rebuild them (see the module docstring)."""

    def __init__(self, proxy: ProxyConfig | Any, image_size: int, device: torch.device):
        self.threshold, self.weight, self.mode = float(proxy.threshold), float(proxy.weight), str(proxy.mode)
        self.persist = not bool(proxy.clear_every_step)
        self.size = (int(image_size), int(image_size))
        self.device = device
        self.layers: list[ProxyLayer] = []
        self.version = 0  # proxy steps recorded so far: names the saved state a checkpoint belongs to

    def __len__(self) -> int:
        """How many distinct images are proxies now."""
        if not self.layers:
            return 0
        return int(torch.unique(torch.cat([layer.index for layer in self.layers])).numel())

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def record(self, layer: ProxyLayer) -> None:
        """Make ``layer`` current: it replaces the earlier steps, or (persisting proxies) follows them."""
        layer = ProxyLayer(layer.index.to(self.device), layer.maps.to(self.device), layer.layer)
        self.layers = [*self.layers, layer] if self.persist else [layer]
        self.version += 1

    def rebuild(self, layer: ProxyLayer, pos: Tensor, images: Tensor) -> Tensor:
        """Proxies of ``images`` (B, 3, S, S) uint8 from the maps at ``pos`` (B,) of ``layer``."""
        maps = layer.maps[pos]
        cams = to_input_size(maps, self.size) if layer.layer else maps.float()
        return to_uint8(make_proxies(to_float(images), cams, self.threshold, self.weight, self.mode))

    def apply(self, indices: Tensor, images: Tensor, upto: Optional[int] = None) -> Tensor:
        """images (B, 3, S, S) uint8 of dataset ``indices`` (B,) → the same with proxies swapped in.

        Runs on the device without a host sync: every image of the batch goes through the rebuild and
        ``torch.where`` keeps the proxies (a few small upsamplings, cheap next to the model's step).
        ``upto``: replay only the first ``upto`` steps of the chain.
        """
        for layer in self.layers[:upto]:
            n = layer.index.numel()
            if n == 0:
                continue
            pos = torch.searchsorted(layer.index, indices).clamp_(max=n - 1)
            hit = layer.index[pos] == indices
            images = torch.where(hit[:, None, None, None], self.rebuild(layer, pos, images), images)
        return images

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.version, "layers": [
            {"index": layer.index.cpu(), "maps": layer.maps.cpu(), "layer": layer.layer} for layer in self.layers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.version = int(state["version"])
        self.layers = [ProxyLayer(d["index"].to(self.device), d["maps"].to(self.device), bool(d["layer"]))
                       for d in state["layers"]]


# ------------------------------------------------------------------------------------------- the step

@dataclass
class StepResult:
    """What one proxy step did: the numbers for ``result.json`` and up to ``log_images`` examples.

    ``stats``: ``misclassified`` (wrong in the epoch before), ``chosen`` (proxied), ``now_correct`` (of
    those, classified correctly by the model at the step), ``explained_true`` (CAMs that explained the
    image's own class: none with ``proxy.target=mistake``), ``pixels_changed``, ``proxies``, ``state_bytes``.
    """

    stats: dict[str, float]
    before: Tensor  # (k, 3, S, S) uint8 originals of the first examples
    after: Tensor  # (k, 3, S, S) uint8 their proxies
    dumped: list[Path] = field(default_factory=list)


def _targets(target: str, idx: Tensor, labels: Tensor, mistakes: Tensor) -> Optional[Tensor]:
    """The class each CAM explains: the wrong class chosen when the mistake was recorded, the true
    class, or None (the class predicted now, read off the CAM's own forward pass)."""
    if target == "mistake":
        return mistakes[idx].long()
    if target == "true":
        return labels[idx]
    return None


def proxy_step(model: torch.nn.Module, bank: Any, state: ProxyState, mistakes: Tensor,
               proxy: ProxyConfig | Any, method: MethodConfig | Any, target_layer: Any,
               generator: torch.Generator, channels_last: bool = False,
               dump_dir: Optional[Path] = None) -> StepResult:
    """Replace the images misclassified in the last epoch by their proxies; record it in ``state``.

    mistakes: (N,) int on the device, one entry per dataset index: the class the model wrongly chose for
    that image in the epoch just before the step, -1 where it was right (or not seen).
    The chosen images stream through in chunks of ``method.batch_size``, so the step's memory does not
    grow with how many are chosen; only ``proxy.log_images`` examples are kept for TensorBoard.
    A step with no mistakes (a model at 100% training accuracy) computes no CAM and records an empty
    layer: every image is its original until the next step.
    """
    wrong = (mistakes >= 0).nonzero().squeeze(1).cpu()  # one sync per step
    chosen = choose_subset(wrong, float(proxy.subset), generator)
    upto = len(state.layers) if state.persist else 0  # clear_every_step: start from the originals
    device = bank.device
    labels = bank.labels
    n = chosen.numel()
    maps: Optional[Tensor] = None
    layer_maps = True
    changed = torch.zeros((), device=device)
    now_correct = torch.zeros((), dtype=torch.long, device=device)
    explained_true = torch.zeros((), dtype=torch.long, device=device)  # CAMs of the image's own class
    keep = int(proxy.log_images)
    before_ex: list[Tensor] = []
    after_ex: list[Tensor] = []
    dumped: list[Path] = []
    start = 0
    for idx_d, originals, _ in bank.batches(chosen, int(method.batch_size)):
        if idx_d.numel() == 0:  # no mistakes to explain (a bank may still hand over an empty batch)
            continue
        before = state.apply(idx_d, originals, upto=upto)
        inp = normalize(to_float(before))
        if channels_last:
            inp = inp.contiguous(memory_format=torch.channels_last)
        targets = _targets(str(proxy.target), idx_d, labels, mistakes)
        out = explain_batch(model, inp, targets,
                            str(method.name), target_layer, impl=str(method.impl),
                            batch_size=int(method.batch_size), at="layer", with_predicted=True)
        if maps is None:  # preallocated once the map size is known: the only state that grows
            layer_maps = out.layer
            shape, dtype = tuple(out.maps.shape[1:]), torch.float32 if out.layer else torch.float16
            maps = torch.empty((n, *shape), dtype=dtype, device=device)
        k = idx_d.numel()
        maps[start:start + k] = out.maps
        chunk = ProxyLayer(idx_d, maps[start:start + k], layer_maps)
        after = state.rebuild(chunk, torch.arange(k, device=device), before)
        changed += (before != after).any(dim=1).float().mean(dim=(1, 2)).sum()
        now_correct += (out.predicted == labels[idx_d]).sum()
        explained_true += ((out.predicted if targets is None else targets) == labels[idx_d]).sum()
        if len(before_ex) * method.batch_size < keep:
            before_ex.append(before[:keep].clone())  # not a view: the chunk itself is let go
            after_ex.append(after[:keep].clone())
        if dump_dir is not None:
            dumped += _dump(dump_dir, idx_d.cpu(), after)
        start += k
    index = chosen.to(device)
    state.record(ProxyLayer(index, maps if maps is not None else torch.zeros((0, 1, 1), device=device), layer_maps))
    stats = {"misclassified": int(wrong.numel()), "chosen": int(n), "images": int(n),
             "now_correct": int(now_correct.item()), "explained_true": int(explained_true.item()),
             "pixels_changed": float(changed.item()) / n if n else 0.0,
             "proxies": len(state), "state_bytes": state.nbytes()}
    empty = torch.zeros((0, 3, *state.size), dtype=torch.uint8)
    return StepResult(stats,
                      torch.cat(before_ex)[:keep].cpu() if before_ex else empty,
                      torch.cat(after_ex)[:keep].cpu() if after_ex else empty, dumped)


def _dump(folder: Path, indices: Tensor, after: Tensor) -> list[Path]:
    """Write proxies as PNG files named by dataset index (``proxy.dump=true``; never the dataset)."""
    from torchvision.io import write_png

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in zip(indices.tolist(), after.cpu()):
        path = folder / f"{i:07d}.png"
        write_png(img, str(path))
        paths.append(path)
    return paths
