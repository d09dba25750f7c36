"""The proxy step as pure tensor functions.

A proxy image is the training image with the pixels the model attended to (CAM >= threshold)
down-weighted or replaced. Everything here is in pixel space, before ImageNet normalisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def make_proxies(images: Tensor, cams: Tensor, threshold: float, weight: float, mode: str) -> Tensor:
    """Proxy images.

    images: (N, C, H, W) float in [0, 1]; cams: (N, H, W) float in [0, 1], min–max normalised per image.
    On pixels where ``cam >= threshold`` (all channels):

    - ``blend``: ``x * (1 - weight * cam)``;
    - ``mean`` / ``max`` / ``min``: the image's own per-channel mean / max / min;
    - ``black`` / ``white``: 0 / 1.

    Returns (N, C, H, W) float in [0, 1]; pixels below the threshold are untouched.
    """
    if images.ndim != 4 or cams.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"images (N,C,H,W) and cams (N,H,W) must match; got {tuple(images.shape)} "
                         f"and {tuple(cams.shape)}")
    cam = cams.to(images.dtype).unsqueeze(1)  # (N, 1, H, W), broadcast over channels
    mask = cam >= threshold
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
