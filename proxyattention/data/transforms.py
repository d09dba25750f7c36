"""Device-side transforms: uint8 → float, ImageNet normalisation, the thesis's training augmentation."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype).view(1, 3, 1, 1).to(device)
    std = torch.tensor(IMAGENET_STD, dtype=dtype).view(1, 3, 1, 1).to(device)
    return mean, std


@functools.lru_cache(maxsize=None)
def _scale_offset(device: torch.device) -> tuple[Tensor, Tensor]:
    """uint8 → normalised input as one multiply and one add: x / (255 std) - mean / std."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    return (1 / (255 * std)).float().to(device), (-mean / std).float().to(device)


def normalize(images: Tensor) -> Tensor:
    """(N, 3, H, W) float in [0, 1] → ImageNet-normalised model input (constants made once per device)."""
    mean, std = _mean_std(images.device, images.dtype)
    return (images - mean) / std


def to_float(images: Tensor) -> Tensor:
    return images.float().div_(255.0)


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """``x`` on ``device`` without blocking the host: a CPU tensor goes to a GPU through pinned memory."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _draw(n: int, generator: torch.Generator, max_degrees: float, p_flip: float,
          p_rotate: float) -> tuple[Tensor, Tensor, Tensor]:
    """(flip (n,) bool, rotated indices, their (k, 2, 3) affine matrices), all on the CPU."""
    flip = torch.rand(n, generator=generator) < p_flip
    rotate = torch.rand(n, generator=generator) < p_rotate
    angle = (torch.rand(n, generator=generator) * 2 - 1) * max_degrees * math.pi / 180 * rotate
    sel = rotate.nonzero().squeeze(1)
    cos, sin = torch.cos(angle[sel]), torch.sin(angle[sel])
    theta = torch.zeros(len(sel), 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    return flip, sel, theta


@functools.lru_cache(maxsize=8)
def _base_grid(h: int, w: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates in [-1, 1] (align_corners=False): x (1, 1, w), y (1, h, 1)."""
    xs = (torch.arange(w, dtype=torch.float64) * 2 + 1) / w - 1
    ys = (torch.arange(h, dtype=torch.float64) * 2 + 1) / h - 1
    return xs.to(device, dtype).view(1, 1, w), ys.to(device, dtype).view(1, h, 1)


def _rotate_(images: Tensor, sel: Tensor, theta: Tensor) -> Tensor:
    """Rotate ``images[sel]`` in place (zeros fill the corners). Only they are resampled: an identity
    grid_sample is not exactly the identity. The sampling grid is ``F.affine_grid``'s, built from cached
    pixel coordinates (four broadcast products instead of a batched matrix product per pixel)."""
    part = images[sel]
    x, y = _base_grid(part.shape[-2], part.shape[-1], images.device, images.dtype)
    t = theta.to(images.dtype)[:, :, :, None, None]  # (k, 2, 3, 1, 1)
    grid = torch.stack((t[:, 0, 0] * x + t[:, 0, 1] * y + t[:, 0, 2],
                        t[:, 1, 0] * x + t[:, 1, 1] * y + t[:, 1, 2]), dim=-1)
    images[sel] = F.grid_sample(part, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return images


def augment(images: Tensor, generator: torch.Generator, max_degrees: float = 10.0,
            p_flip: float = 0.5, p_rotate: float = 0.5) -> Tensor:
    """The thesis's training augmentation, batched on the images' device.

    images: (N, 3, H, W) float in [0, 1]. Each image is flipped horizontally with probability
    ``p_flip`` and rotated by a uniform angle in [-max_degrees, max_degrees] with probability
    ``p_rotate`` (zeros fill the corners, as torchvision's RandomRotation). Random numbers come from the
    CPU ``generator`` so a seed gives the same augmentation on any device; they reach the device in
    non-blocking copies, so augmenting never waits for the GPU.
    """
    device = images.device
    flip, sel, theta = _draw(images.shape[0], generator, max_degrees, p_flip, p_rotate)
    images = torch.where(to_device(flip, device)[:, None, None, None], images.flip(-1), images)
    return _rotate_(images, to_device(sel, device), to_device(theta, device)) if len(sel) else images


def training_input(images: Tensor, generator: torch.Generator, max_degrees: float = 10.0,
                   p_flip: float = 0.5, p_rotate: float = 0.5) -> Tensor:
    """``normalize(augment(to_float(images), generator))`` for uint8 ``images``, in fewer passes over memory.

    One conversion to float (kept in 0..255), flips and rotations in place on the images they touch,
    then one fused multiply-add that divides by 255 and normalises (the rotation is linear and fills
    with zeros, so scaling after it is the same as before). Equal to the three-step form up to float
    rounding, with the same random numbers.
    """
    device = images.device
    flip, sel, theta = _draw(images.shape[0], generator, max_degrees, p_flip, p_rotate)
    x = images.float()
    fidx = flip.nonzero().squeeze(1)
    if len(fidx):
        fidx = to_device(fidx, device)
        x[fidx] = x[fidx].flip(-1)
    if len(sel):
        _rotate_(x, to_device(sel, device), to_device(theta, device))
    scale, offset = _scale_offset(device)
    return torch.addcmul(offset, x, scale, out=x)
