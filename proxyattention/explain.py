"""Explainability metrics: how well a saliency map explains a classifier's decision, as numbers.

Definitions (c = the explained class: by default the class the model predicts for the clean image, as
Grad-CAM++ and RISE score it, ``explain.target=true`` for the true label; p = softmax probability of c on
the image, o = on the image multiplied by its saliency map S, (H, W) in [0, 1] at input resolution):

- Average Drop ``AD = mean(max(p - o, 0) / p) * 100`` and Average Increase ``AI = mean(1[p < o]) * 100``
  (Grad-CAM++, Chattopadhyay et al. 2018). Lower AD, higher AI is better.
- Average Gain ``AG = mean(max(o - p, 0) / (1 - p)) * 100`` (Opti-CAM, Zhang et al. 2024). Higher is better.
- Insertion / Deletion (RISE, Petsiuk et al. 2018): the area under p as the pixels are, in order of
  decreasing saliency, copied into a blurred copy of the image (insertion, higher is better) or removed
  (deletion, lower is better), over ``steps`` equal steps; the area uses the trapezoid rule on [0, 1].
- Energy pointing game (Score-CAM, Wang et al. 2020): the share of the map's mass inside the object's
  ground-truth mask. Higher is better; 1 is all attention on the object.

What a masked pixel becomes (``explain.fill``): ``black`` multiplies the image in pixel space (images in
[0, 1], black = 0) before ``preprocess`` (ImageNet normalisation), as the papers perturb the image itself;
``mean`` multiplies the *normalised* tensor, so a masked pixel becomes the normalisation mean (grey) —
pytorch-grad-cam's ``metrics.cam_mult_image`` (``DropInConfidence``, ``IncreaseInConfidence``) and RISE's
deletion (which zeroes the normalised tensor). Insertion does not depend on it (the blur and the mix are
linear, the normalisation affine). A test checks AD and AI against pytorch-grad-cam to 1e-5.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from proxyattention.config import EXPLAIN_FILLS
from proxyattention.data.transforms import normalize, to_float

log = logging.getLogger(__name__)

Preprocess = Callable[[Tensor], Tensor]

# RISE's insertion baseline: a Gaussian blur with an 11-pixel kernel and sigma 5 (their 224-px setting).
BLUR_KERNEL = 11
BLUR_SIGMA = 5.0


def _identity(x: Tensor) -> Tensor:
    return x


def _true_class_prob(model: torch.nn.Module, inputs: Tensor, labels: Tensor) -> Tensor:
    """(N,) float: softmax probability of ``labels`` for model inputs (N, 3, H, W)."""
    logits = model(inputs).float()
    return logits.softmax(1).gather(1, labels.view(-1, 1)).squeeze(1)


class _EvalMode:
    """Eval mode and no autograd for the duration; the model's previous mode is restored after."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        self.model.train(self.was_training)
        self.no_grad.__exit__(*exc)


def masked(x: Tensor, keep: Tensor, preprocess: Preprocess, fill: str) -> Tensor:
    """Model input of images ``x`` (N, 3, H, W) in [0, 1] with each pixel scaled by ``keep`` (N, 1, H, W):
    in pixel space (``black``) or in the normalised tensor (``mean``)."""
    if fill == "black":
        return preprocess(x * keep)
    if fill == "mean":
        return preprocess(x) * keep
    raise ValueError(f"explain.fill={fill!r} is not one of: {', '.join(EXPLAIN_FILLS)}")


def confidences(model: torch.nn.Module, images: Tensor, labels: Tensor, saliency: Tensor,
                preprocess: Preprocess = normalize, batch_size: int = 64,
                fill: str = "black") -> tuple[Tensor, Tensor]:
    """(p, o): probabilities of the explained classes on the image and on the image multiplied by its map.

    images: (N, 3, H, W) float in [0, 1]; labels: (N,) long, the explained classes; saliency: (N, H, W)
    float in [0, 1]. Returns two (N,) float tensors on the images' device.
    """
    ps, os_ = [], []
    with _EvalMode(model):
        for x, y, s in zip(images.split(batch_size), labels.split(batch_size), saliency.split(batch_size)):
            ps.append(_true_class_prob(model, preprocess(x), y))
            os_.append(_true_class_prob(model, masked(x, s.unsqueeze(1), preprocess, fill), y))
    empty = images.new_zeros(0)
    return (torch.cat(ps) if ps else empty), (torch.cat(os_) if os_ else empty)


def average_drop(p: Tensor, o: Tensor) -> float:
    """AD in percent (lower is better)."""
    return float(((p - o).clamp(min=0) / p.clamp(min=1e-12)).mean() * 100)


def average_increase(p: Tensor, o: Tensor) -> float:
    """AI in percent (higher is better)."""
    return float((p < o).float().mean() * 100)


def average_gain(p: Tensor, o: Tensor) -> float:
    """AG in percent (higher is better). An image with p = 1 cannot gain and counts as 0."""
    gain = (o - p).clamp(min=0) / (1 - p).clamp(min=1e-12)
    return float(torch.where(p >= 1, torch.zeros_like(gain), gain).mean() * 100)


def blur(images: Tensor, kernel: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> Tensor:
    """RISE's insertion start: a separable Gaussian blur with reflected borders. images: (N, C, H, W)."""
    h, w = images.shape[-2:]
    kernel = min(kernel, 2 * ((min(h, w) - 1) // 2) + 1)  # reflect padding needs pad < size
    if kernel < 3:
        return images.clone()
    half = kernel // 2
    t = torch.arange(kernel, device=images.device, dtype=images.dtype) - half
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    c = images.shape[1]
    x = F.pad(images, (half, half, half, half), mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, kernel).expand(c, 1, 1, kernel), groups=c)
    return F.conv2d(x, g.view(1, 1, kernel, 1).expand(c, 1, kernel, 1), groups=c)


def saliency_rank(saliency: Tensor) -> Tensor:
    """(N, H, W) long: each pixel's position when the image's pixels are sorted by decreasing saliency.

    Ties keep raster order, so the ranking (and every curve built on it) is deterministic.
    """
    n, h, w = saliency.shape
    order = torch.argsort(-saliency.reshape(n, -1), dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=saliency.device).expand(n, -1).contiguous())
    return rank.view(n, h, w)


def insertion_deletion_curves(model: torch.nn.Module, images: Tensor, labels: Tensor, saliency: Tensor,
                              steps: int = 20, preprocess: Preprocess = normalize,
                              batch_size: int = 64, fill: str = "black") -> tuple[Tensor, Tensor]:
    """Probability of the explained class after each step of insertion and of deletion.

    Step k (0..steps) has the ``round(k * H * W / steps)`` most salient pixels inserted into the blurred
    image, or deleted from the image (made black, or the normalisation mean: ``fill``). Returns
    (insertion, deletion), each (N, steps + 1).
    """
    n, _, h, w = images.shape
    counts = [round(k * h * w / steps) for k in range(steps + 1)]
    ins_rows, del_rows = [], []
    with _EvalMode(model):
        for x, y, s in zip(images.split(batch_size), labels.split(batch_size), saliency.split(batch_size)):
            rank = saliency_rank(s).unsqueeze(1)  # (b, 1, H, W)
            start = blur(x)
            ins, dele = [], []
            for count in counts:
                shown = (rank < count).to(x.dtype)
                ins.append(_true_class_prob(model, preprocess(start + (x - start) * shown), y))
                dele.append(_true_class_prob(model, masked(x, 1 - shown, preprocess, fill), y))
            ins_rows.append(torch.stack(ins, 1))
            del_rows.append(torch.stack(dele, 1))
    empty = images.new_zeros(0, steps + 1)
    return (torch.cat(ins_rows) if ins_rows else empty), (torch.cat(del_rows) if del_rows else empty)


def curve_auc(curves: Tensor) -> Tensor:
    """(N, K+1) values at K equal steps on [0, 1] → (N,) trapezoid areas (as RISE computes them)."""
    k = curves.shape[1] - 1
    return (curves.sum(1) - curves[:, 0] / 2 - curves[:, -1] / 2) / k


def energy_pointing(saliency: Tensor, masks: Tensor) -> Tensor:
    """(N,) share of each map's mass inside its object mask; NaN where a map is all zero.

    saliency: (N, H, W) float ≥ 0; masks: (N, H, W) bool (or 0/1) at the same resolution.
    """
    total = saliency.flatten(1).sum(1)
    inside = (saliency * masks.to(saliency.dtype)).flatten(1).sum(1)
    return torch.where(total > 0, inside / total.clamp(min=1e-12), torch.full_like(total, math.nan))


def explanation_metrics(model: torch.nn.Module, images: Tensor, labels: Tensor, saliency: Tensor,
                        masks: Optional[Tensor] = None, steps: int = 20,
                        preprocess: Preprocess = normalize, batch_size: int = 64,
                        fill: str = "black") -> dict[str, float]:
    """Every metric, averaged over the images, under the keys used in ``result.json``.

    images: (N, 3, H, W) float in [0, 1]; labels: (N,) long; saliency: (N, H, W) float in [0, 1];
    masks: optional (N, H, W) bool object masks, which add ``explain/pointing``.
    """
    p, o = confidences(model, images, labels, saliency, preprocess, batch_size, fill)
    ins, dele = insertion_deletion_curves(model, images, labels, saliency, steps, preprocess, batch_size, fill)
    out = {
        "explain/ad": average_drop(p, o),
        "explain/ai": average_increase(p, o),
        "explain/ag": average_gain(p, o),
        "explain/insertion": float(curve_auc(ins).mean()),
        "explain/deletion": float(curve_auc(dele).mean()),
        "explain/images": int(images.shape[0]),
    }
    if masks is not None:
        out["explain/pointing"] = float(energy_pointing(saliency, masks).nanmean())
    return out


def choose_images(test_idx: Tensor, count: int, seed: int) -> Tensor:
    """A seeded subset of ``count`` test indices (all when count is 0 or larger), sorted.

    The generator depends on the seed alone, so a proxy trial and its paired baseline (same seed, same
    split) are judged on the same images, and a sorted test split (imagefolder: class by class) is not
    cut to its first classes.
    """
    if count <= 0 or count >= test_idx.numel():
        return test_idx
    g = torch.Generator().manual_seed(10_007 * int(seed) + 17)
    return test_idx[torch.randperm(test_idx.numel(), generator=g)[:count]].sort().values


def masks_at(masks: Any, indices: Tensor, size: tuple[int, int]) -> Tensor:
    """Object masks of ``indices`` at the model's input size: (K, H, W) bool.

    masks: (N, h, w) bool array or tensor for the whole dataset, at any resolution (resized nearest).
    """
    m = torch.as_tensor(masks[indices.cpu().numpy()] if not isinstance(masks, Tensor) else masks[indices])
    m = m.reshape(-1, *m.shape[-2:])
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m[:, None].float(), size=tuple(size), mode="nearest")[:, 0]
    return m > 0.5 if m.dtype != torch.bool else m


VAL_PREFIX = "val/"  # the validation-image metrics: val/explain/ad, …, which a search may select on


def explain_trial(model: torch.nn.Module, bank: Any, test_idx: Tensor, cfg: Any, target_layer: Any,
                  masks: Optional[Tensor] = None, count: Optional[int] = None,
                  warn: bool = True) -> dict[str, float]:
    """The ``explain/*`` metrics of a trained trial on its test images (``cfg.explain`` says how).

    bank: the trial's :class:`~proxyattention.data.bank.ImageBank`; test_idx: (T,) long test indices
    (any split's: :func:`explain_validation` passes the validation ones); count: how many of them, a
    seeded subset (default ``cfg.explain.images``; 0 = all); masks: optional (len(dataset), h, w) bool
    object masks, indexed like the bank, any resolution.
    The CAMs explain, and the metrics score, the class ``cfg.explain.target`` names (the model's
    prediction on the clean image, or the true label) with ``cfg.explain.method``, which should differ
    from the training method (docs/method.md); the model's mode and gradients are left as they were.
    """
    from proxyattention.cam import explain_batch

    e = cfg.explain
    if warn and e.method == cfg.method.name and cfg.proxy.enabled:
        log.warning("explain.method=%s is also the training method; the thesis judges a model with a "
                    "different CAM method (set explain.method)", e.method)
    idx = choose_images(test_idx.cpu(), int(e.images if count is None else count), int(cfg.train.seed))
    images, classes, maps = [], [], []
    for _, imgs, y in bank.batches(idx, int(e.batch_size)):
        x = to_float(imgs)
        # explain.target=predicted: the CAM call explains, and reports, the class the model predicts (read
        # off its own eval-mode forward pass on the native path).
        out = explain_batch(model, normalize(x), None if e.target == "predicted" else y, e.method,
                            target_layer, impl=e.impl, batch_size=int(e.batch_size), with_predicted=True)
        maps.append(out.maps.float())
        images.append(x)
        classes.append(out.predicted if e.target == "predicted" else y)
    x, y, s = torch.cat(images), torch.cat(classes), torch.cat(maps)
    m = None if masks is None else masks_at(masks, idx, x.shape[-2:]).to(x.device)
    return explanation_metrics(model, x, y, s, m, steps=int(e.steps), batch_size=int(e.batch_size),
                               fill=str(e.fill))


def explain_validation(model: torch.nn.Module, bank: Any, val_idx: Tensor, cfg: Any, target_layer: Any,
                       masks: Optional[Tensor] = None) -> dict[str, float]:
    """The same metrics on ``cfg.explain.val_images`` validation images (a seeded subset: the same for a
    cell and its paired baseline, which share seed and split), named ``val/explain/*`` — what a search
    may select on (``hydra.launcher.objective=val/explain/insertion``) without looking at the test split.
    Empty when ``explain.val_images`` is 0."""
    count = int(getattr(cfg.explain, "val_images", 0) or 0)
    if count <= 0 or val_idx.numel() == 0:
        return {}
    got = explain_trial(model, bank, val_idx, cfg, target_layer, masks, count=count, warn=False)
    return {VAL_PREFIX + k: v for k, v in got.items()}
