"""Class-activation maps: a batched torch path for the gradient methods, pytorch-grad-cam for the rest.

Claim (``bench/cam.py``): the native path gives the library's maps to 1e-4 (1e-6 measured) and, for
GradCAM++ on resnet18 (batch 64, 64 px, CPU), takes about a third of the library's time (0.33-0.35 on
a shared 2-core machine, single thread, CPU clock). That is close to the floor: the native path costs
about 1.2 forward passes, the library about 3. Where the time goes:

- the library runs the whole model with weight gradients, fills every parameter's ``.grad`` and then
  moves activations and gradients through numpy, resizing image by image with cv2;
- the native path runs the layers before the target layer without autograd (parameters are frozen for
  the call), makes the target layer's output a fresh leaf, and asks ``torch.autograd.grad`` for the
  gradient of the summed target scores with respect to that leaf only: one forward and one short
  backward per batch, no weight gradients, maps resized on the tensor's device;
- on CPU the native forward runs on channels-last input, oneDNN's fast layout (about a fifth of the
  native time saved at this size; the maps are unchanged).

The post-processing reproduces the library step by step: ReLU, per-image min-max (``x - min`` divided
by the max, where the library divides by ``1e-7 + max``), bilinear resize to the input (cv2's ``INTER_LINEAR`` for upsampling is
``F.interpolate(..., align_corners=False)``), ReLU, min-max again. A map that is constant for an image
therefore comes out as all zeros for that image.

Eigen methods (eigencam, eigengradcam) project on the first right singular vector, whose sign is a
LAPACK artefact: MKL (torch) and OpenBLAS (numpy) pick different signs for the same matrix, so the
library's map and its opposite are equally likely, and on a trained model an EigenGradCAM map is
anti-correlated with GradCAM's on about a third of the images. The native path gives the projection a
meaningful sign. EigenGradCAM: of the projection's two lobes (the map keeps only the positive part, so
the sign chooses which lobe is shown), the one whose ReLU correlates more with GradCAM's ReLU'd map of
the same activations and gradients — the class evidence the method already has, so the map points where
GradCAM says the evidence is. ``python -m bench.explain --model NAME`` measures it: the sign it picks is
the one whose final map agrees better with pytorch-grad-cam's GradCAM map on 0.970-0.989 of the test
images of trained test_resnets (three seeds; the previous rule, the channel sum of the gradient-weighted
activations without the ReLU: 0.896-0.911), 0.996 for resnet18, but only 0.918-0.926 for the
EfficientNets (0.836 before), whose CAM layer's activations are signed and whose gradient CAMs disagree
among themselves more. The figure is not independent evidence (the rule looks at GradCAM's layer map);
the bench prints beside it the agreement with HiResCAM's and LayerCAM's maps, which the rule does not
see. Where GradCAM cannot decide (a constant map, a tie) the projection correlates non-negatively with
the channel sum of what was decomposed, which is EigenCAM's rule (its activations: it has no gradients,
and no class to point at). Up to that sign it is the library's map (a test checks both);
``method.impl=library`` keeps the library's sign. The SVD runs batched in torch on the maps' device (no
host sync). SegEigenCAM keeps the library's own sign rule and numpy SVD.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from proxyattention.config import CAM_IMPLS, CAM_METHODS, NATIVE_CAM_METHODS
from proxyattention.models import TargetLayer, reshape_transform_for

log = logging.getLogger(__name__)

EPS_NORM = 1e-7  # pytorch-grad-cam's scale_cam_image


def cam_method_names() -> tuple[str, ...]:
    """Every CAM method name accepted by ``method.name``."""
    return CAM_METHODS


# --- the native methods: (activations, gradients) (n, C, h, w) float32 -> map (n, h, w) ------------

def _gradcam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (g.mean(dim=(2, 3), keepdim=True) * a).sum(1)


def _gradcampp(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    # Eq. 19 of arXiv:1710.11063, as pytorch-grad-cam writes it (eps 1e-6, alpha 0 where grad is 0).
    g2 = g * g
    sum_a = a.sum(dim=(2, 3), keepdim=True)
    alpha = g2 / (2 * g2 + sum_a * g2 * g + 1e-6)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    weights = (g.clamp_min(0) * alpha).sum(dim=(2, 3), keepdim=True)
    return (weights * a).sum(1)


def _xgradcam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    sum_a = a.sum(dim=(2, 3), keepdim=True)
    weights = (g * a / (sum_a + 1e-7)).sum(dim=(2, 3), keepdim=True)
    return (weights * a).sum(1)


def _hirescam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (g * a).sum(1)


def _layercam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (g.clamp_min(0) * a).sum(1)


def _gradcamelementwise(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (g * a).clamp_min(0).sum(1)


def _projection(x: torch.Tensor, sign_correct: bool = False) -> torch.Tensor:
    """pytorch-grad-cam's ``get_2d_projection``: (n, C, h, w) -> (n, h, w), numpy SVD (see module doc)."""
    n, c, h, w = x.shape
    arr = x.detach().float().cpu().numpy().reshape(n, c, h * w).transpose(0, 2, 1)
    arr = np.where(np.isnan(arr), np.float32(0), arr)
    arr = arr - arr.mean(axis=1, keepdims=True)
    # Reduced SVD, batched: same first singular vector (and sign) as the library's full per-image SVD.
    _, _, vt = np.linalg.svd(arr, full_matrices=False)
    proj = np.einsum("npc,nc->np", arr, vt[:, 0, :]).astype(np.float32)
    if sign_correct:
        flip = np.abs(proj.min(axis=1)) > np.abs(proj.max(axis=1))
        proj[flip] = -proj[flip]
    return torch.from_numpy(proj.reshape(n, h, w)).to(x.device)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, p), (n, p) -> (n,) Pearson correlation of each row pair; 0 where either row is constant."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    norm = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(norm > 0, (a * b).sum(dim=1) / norm.clamp_min(1e-30), torch.zeros_like(norm))


def oriented_projection(x: torch.Tensor, evidence: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(n, C, h, w) -> (n, h, w): the projection on the first principal component, signed (see the
    module doc). ``evidence`` (n, h, w), a class-evidence map such as GradCAM's: the sign whose positive
    lobe correlates more with ReLU(evidence). Without it, or where that does not decide, the sign that
    correlates non-negatively with the channel sum of ``x``."""
    n, c, h, w = x.shape
    arr = torch.nan_to_num(x.detach().float()).reshape(n, c, h * w).transpose(1, 2)  # (n, positions, C)
    centred = arr - arr.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    proj = torch.einsum("npc,nc->np", centred, vh[:, 0, :])
    reference = arr.sum(dim=2)
    agreement = (proj * (reference - reference.mean(dim=1, keepdim=True))).sum(dim=1)
    if evidence is not None:
        shown = torch.nan_to_num(evidence.detach().float()).reshape(n, h * w).clamp_min(0)
        lobes = _correlation(proj.clamp_min(0), shown) - _correlation((-proj).clamp_min(0), shown)
        agreement = torch.where(lobes != 0, lobes, agreement)
    return (proj * torch.where(agreement < 0, -1.0, 1.0)[:, None]).reshape(n, h, w)


def _eigencam(a: torch.Tensor, g: Optional[torch.Tensor]) -> torch.Tensor:
    return oriented_projection(a)


def _eigengradcam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return oriented_projection(g * a, evidence=_gradcam(a, g))


def _segeigencam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return _projection(g.abs() * a, sign_correct=True)


_NATIVE: dict[str, tuple[Callable[..., torch.Tensor], bool]] = {  # name -> (map, needs gradients)
    "gradcam": (_gradcam, True),
    "gradcampp": (_gradcampp, True),
    "xgradcam": (_xgradcam, True),
    "hirescam": (_hirescam, True),
    "layercam": (_layercam, True),
    "gradcamelementwise": (_gradcamelementwise, True),
    "eigengradcam": (_eigengradcam, True),
    "eigencam": (_eigencam, False),
    "segeigencam": (_segeigencam, True),
}
assert set(NATIVE_CAM_METHODS) <= set(_NATIVE), "NATIVE_CAM_METHODS names a method cam.py lacks"


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Per-image min-max to [0, 1], the maximum exactly 1; a constant map becomes all zeros.

    The library divides by ``1e-7 + max`` (its maximum is 0.99999988); dividing by the maximum itself
    lets ``proxy.threshold=1.0`` select the most attended pixels. The maps differ from the library's by
    at most 1e-7 relative.
    """
    x = x - x.amin(dim=(1, 2), keepdim=True)
    peak = x.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > EPS_NORM, x / peak.clamp_min(EPS_NORM), torch.zeros_like(x))


def to_input_size(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(n, h, w) raw layer map -> (n, H, W) float32 in [0, 1], the library's post-processing step by step.

    What :func:`compute_cams` does after the layer's map: ``compute_cams(..., at="layer")`` followed by
    this gives ``compute_cams(..., at="input")`` exactly (the proxy state stores the small layer map).
    """
    cam = _minmax(cam.float().clamp_min(0))
    if tuple(cam.shape[-2:]) != tuple(size):
        cam = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return _minmax(cam.clamp_min(0))


# --- model state: what a CAM call may touch and must give back --------------------------------------

@contextlib.contextmanager
def _model_state_kept(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Restore every module's train/eval flag and every parameter's requires_grad and ``.grad``."""
    training = {m: m.training for m in model.modules()}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        yield params
    finally:
        for m, mode in training.items():
            m.training = mode
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad


@contextlib.contextmanager
def _grad_on() -> Iterator[None]:
    # Callers often hold torch.no_grad (or inference_mode) around evaluation code.
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _native_batch(model: nn.Module, images: torch.Tensor, targets: Optional[torch.Tensor], method: str,
                  target: TargetLayer, reshape: Optional[Callable]) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw layer maps (n, h, w) float32, predicted classes (n,) long) of one batch."""
    fn, needs_grads = _NATIVE[method]
    captured: list[torch.Tensor] = []

    def keep_output(module: nn.Module, args: object, output: torch.Tensor) -> Optional[torch.Tensor]:
        if captured:
            raise RuntimeError(f"target layer {target.name!r} runs more than once per forward pass; "
                               "set model.target_layer to a layer that runs once")
        # A fresh leaf: autograd starts here, so the layers before it build no graph. The clone keeps
        # in-place ops of the following layers off the leaf itself.
        leaf = output.detach().requires_grad_(needs_grads)
        captured.append(leaf)
        return leaf.clone() if needs_grads else None

    handle = target.module.register_forward_hook(keep_output)
    try:
        logits = model(images)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"target layer {target.name!r} did not run in the forward pass")
    act = captured[0]
    grads = None
    if targets is None:  # the predicted class, from this same forward pass
        targets = logits.detach().argmax(1)
    if needs_grads:
        score = logits.gather(1, targets.to(logits.device).view(-1, 1)).sum()
        (grads,) = torch.autograd.grad(score, act)
    if reshape is not None:
        act = reshape(act)
        grads = reshape(grads) if grads is not None else None
    act = act.detach().float()
    grads = grads.float() if grads is not None else None
    return fn(act, grads), logits.detach().argmax(1)


def _native_cams(model: nn.Module, images: torch.Tensor, targets: Optional[torch.Tensor], method: str,
                 target: TargetLayer, batch_size: int, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    reshape = reshape_transform_for(model, target)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with _model_state_kept(model) as params, _grad_on():
        model.eval()
        for p in params:
            p.requires_grad_(False)  # no weight gradients, no graph before the target layer
        chunks = targets.split(batch_size) if targets is not None else [None] * math.ceil(len(images) / batch_size)
        out = [_native_batch(model, x, t, method, target, reshape)
               for x, t in zip(images.split(batch_size), chunks)]
    return torch.cat([m for m, _ in out]), torch.cat([p for _, p in out])


# --- pytorch-grad-cam ------------------------------------------------------------------------------

def _library_cam(method: str, model: nn.Module, target: TargetLayer, reshape: Optional[Callable],
                 batch_size: int) -> object:
    import pytorch_grad_cam as pgc

    layers = [target.module]
    if method == "ablationcam":
        layer = pgc.AblationLayerVit() if target.layout == "tokens" else pgc.AblationLayer()
        return pgc.AblationCAM(model, layers, reshape, ablation_layer=layer, batch_size=batch_size)
    if method == "fullgrad":
        # FullGrad explains every Conv2d/BatchNorm2d bias (NCHW outputs), not the target layer.
        return pgc.FullGrad(model, [], None)
    classes = {
        "gradcam": pgc.GradCAM, "gradcampp": pgc.GradCAMPlusPlus, "eigengradcam": pgc.EigenGradCAM,
        "eigencam": pgc.EigenCAM, "xgradcam": pgc.XGradCAM, "layercam": pgc.LayerCAM,
        "hirescam": pgc.HiResCAM, "scorecam": pgc.ScoreCAM, "gradcamelementwise": pgc.GradCAMElementWise,
        "kpcacam": pgc.KPCA_CAM, "shapleycam": pgc.ShapleyCAM, "finercam": pgc.FinerCAM,
        "fem": pgc.FEM, "segeigencam": pgc.SegEigenCAM,
    }
    cam = classes[method](model, layers, reshape)
    if method == "scorecam":
        cam.batch_size = batch_size
    return cam


def _library_targets(method: str, model: nn.Module, images: torch.Tensor,
                     targets: torch.Tensor) -> list:
    from pytorch_grad_cam.utils.model_targets import (
        ClassifierOutputTarget,
        FinerWeightedTarget,
    )

    classes = [int(t) for t in targets.tolist()]
    if method != "finercam":
        return [ClassifierOutputTarget(c) for c in classes]
    # FinerCAM contrasts the explained class with the classes whose scores are closest to it (the
    # library's own choice when it picks the class itself): the three nearest, weight alpha = 1.
    with torch.no_grad():
        logits = model(images).float()
    picked = logits.gather(1, targets.to(logits.device).view(-1, 1))
    order = (logits - picked).abs().argsort(dim=1).tolist()
    return [FinerWeightedTarget(c, [k for k in row if k != c][:3], 1.0) for c, row in zip(classes, order)]


def _release(cam: object) -> None:
    # The library's own release() detaches its stored tensors in place, which raises for views (the
    # reshaped ViT gradients of ShapleyCAM) before the hooks are removed: remove them first, then drop
    # the tensors instead of detaching them.
    store = getattr(cam, "base_cam", cam).activations_and_grads  # FinerCAM wraps a GradCAM
    for handle in store.handles:
        handle.remove()
    store.handles.clear()
    store.activations, store.gradients = [], []


def _library_cams(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, method: str,
                  target: TargetLayer, batch_size: int) -> torch.Tensor:
    reshape = reshape_transform_for(model, target)
    with _model_state_kept(model) as params, _grad_on():
        for p in params:
            # The library needs gradients through the model even when the caller froze it; its
            # backward fills .grad, so start from None and let _model_state_kept put the caller's back.
            p.requires_grad_(True)
            p.grad = None
        cam = _library_cam(method, model, target, reshape, batch_size)  # calls model.eval()
        try:
            maps = [torch.from_numpy(np.asarray(cam(x, _library_targets(method, model, x, t)),
                                                dtype=np.float32))
                    for x, t in zip(images.split(batch_size), targets.split(batch_size))]
        finally:
            _release(cam)
    return torch.cat(maps).to(images.device)


def compute_cams(model: nn.Module, images: torch.Tensor, targets: Optional[torch.Tensor], method: str,
                 target: TargetLayer, impl: str = "auto", batch_size: int = 64, *,
                 channels_last: Optional[bool] = None) -> torch.Tensor:
    """CAMs of ``targets`` for ``images``, one per image, at input resolution (see :func:`explain_batch`)."""
    return explain_batch(model, images, targets, method, target, impl, batch_size,
                         channels_last=channels_last).maps


def native(method: str, impl: str) -> bool:
    """Whether ``method`` runs on the batched torch path under ``impl``."""
    return impl != "library" and method in NATIVE_CAM_METHODS


@dataclass
class Explained:
    """What one CAM call gives.

    maps: (N, H, W) float32 in [0, 1] at input resolution; or, asked ``at="layer"`` on the native path,
    the raw (N, h, w) maps of the target layer (``layer=True``), which :func:`to_input_size` turns into
    the input-resolution maps exactly. predicted: (N,) long, the class the model predicts for each
    image in eval mode (read off the native path's own forward pass; on the library path only when
    asked for with ``with_predicted``, as it costs a forward pass there).
    """

    maps: torch.Tensor
    predicted: Optional[torch.Tensor]
    layer: bool


def explain_batch(model: nn.Module, images: torch.Tensor, targets: Optional[torch.Tensor], method: str,
                  target: TargetLayer, impl: str = "auto", batch_size: int = 64, *,
                  channels_last: Optional[bool] = None, at: str = "input",
                  with_predicted: bool = False) -> Explained:
    """CAMs of ``targets`` for ``images``, one per image.

    images: (N, 3, H, W) float, normalised model input, on the model's device.
    targets: (N,) long, the class each map explains; None: the class the model predicts for each image
    (in eval mode; the native path reads it off its own forward pass, so it costs nothing extra).
    method: one of :func:`cam_method_names`; impl: ``auto`` (native where available), ``native`` or
    ``library`` (pytorch-grad-cam).
    at: ``input`` (maps at input resolution) or ``layer`` (the target layer's raw maps, native path
    only; the library path always gives input resolution).
    Returns :class:`Explained`; input-resolution maps are float32 in [0, 1], min-max normalised per
    image, on ``images.device``, and a map that is constant for an image is all zeros. Runs in eval mode and leaves the model as it found it:
    train/eval flags, parameters' requires_grad and ``.grad``, no hooks. Works under ``torch.no_grad``.
    channels_last: run the native path's forward on channels-last input; None = on CPU, where oneDNN's
    convolutions are faster that way (``bench/cam.py`` measures it). The maps do not change.
    """
    if at not in ("input", "layer"):
        raise ValueError(f"at={at!r}: choose input or layer")
    if method not in CAM_METHODS:
        raise ValueError(f"method.name={method!r} is not a CAM method; choose one of: "
                         f"{', '.join(CAM_METHODS)}")
    if impl not in CAM_IMPLS:
        raise ValueError(f"method.impl={impl!r} is not allowed; choose one of: {', '.join(CAM_IMPLS)}")
    if impl == "native" and method not in NATIVE_CAM_METHODS:
        raise ValueError(f"method.impl=native has no batched path for method.name={method!r}; "
                         f"native methods: {', '.join(NATIVE_CAM_METHODS)}; use method.impl=auto")
    if images.ndim != 4 or (targets is not None and targets.shape != images.shape[:1]):
        raise ValueError(f"expected images (N, 3, H, W) and targets (N,), got {tuple(images.shape)} "
                         f"and {tuple(targets.shape)}")
    if images.shape[0] == 0:
        empty = images.new_zeros((0, *images.shape[-2:]), dtype=torch.float32)
        return Explained(empty, torch.zeros(0, dtype=torch.long, device=images.device), False)
    if native(method, impl):
        maps = predicted = None
        if channels_last is None and images.device.type == "cpu":
            try:
                maps, predicted = _native_cams(model, images, targets, method, target, batch_size, True)
            except RuntimeError:
                # A model that .view()s its feature maps rejects channels-last input; the layout is
                # only a speed choice, so run it as given.
                log.debug("native CAM: channels-last input failed for %s; using NCHW", target.name)
                channels_last = False
        if maps is None:
            maps, predicted = _native_cams(model, images, targets, method, target, batch_size,
                                           bool(channels_last))
        if at == "layer":
            return Explained(maps, predicted, True)
        return Explained(to_input_size(maps, tuple(images.shape[-2:])), predicted, False)
    predicted = _predicted(model, images, batch_size) if targets is None or with_predicted else None
    maps = _library_cams(model, images, predicted if targets is None else targets, method, target, batch_size)
    return Explained(_minmax(maps.clamp_min(0)), predicted, False)  # the maximum exactly 1, as native maps


def _predicted(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N,) the class the model predicts for each image in eval mode; the mode is restored."""
    with _model_state_kept(model), torch.no_grad():
        model.eval()
        return torch.cat([model(x).argmax(1) for x in images.split(batch_size)])
