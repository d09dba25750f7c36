"""Models: ``timm.create_model`` plus the choice of the layer a CAM explains.

The CAM layer is chosen without per-architecture code: timm's ``feature_info`` lists each stage's module
and reduction, and one forward pass with a dummy input of the configured size measures the real maps.
The rule is "the deepest stage whose map is at least 4x4", because timm CNNs reduce 32x and a 1x1 map
gives a constant CAM: resnet18 at 32 px explains ``layer2`` (4x4), at 64 px ``layer3``, at 224 px
``layer4``. Token models (ViT) explain the last block's ``norm1``, reshaped to the patch grid, as
pytorch-grad-cam's documentation does.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import timm
import torch
from torch import nn

from proxyattention import weights

log = logging.getLogger(__name__)

MIN_DEFAULT_MAP = 4  # the automatic choice wants at least 4x4 so the CAM has some spatial detail
MIN_NAMED_MAP = 2  # below 2x2 the min-max normalised CAM is constant (all zeros)


class ModelSetupError(RuntimeError):
    """A model that cannot be built or explained as configured; the message says which key to change."""


@dataclass
class TargetLayer:
    """The module a CAM explains.

    name: module path inside the model (``model.get_submodule(name)``).
    map_hw: the spatial size (h, w) of the CAM before upsampling, at the configured input size.
    layout: how the module's output is laid out: ``NCHW`` (CNNs), ``NHWC`` (e.g. Swin) or ``tokens``
        ((N, prefix + h*w, C), ViT-like); :func:`reshape_transform_for` turns the last two into NCHW.
    num_prefix_tokens: class/register tokens ahead of the patch tokens (``tokens`` layout only).
    """

    name: str
    module: nn.Module
    map_hw: tuple[int, int]
    layout: str = "NCHW"
    num_prefix_tokens: int = 0


class TokensToMap:
    """Reshape transform for token outputs: drop prefix tokens, (N, h*w, C) -> (N, C, h, w)."""

    def __init__(self, num_prefix_tokens: int, map_hw: tuple[int, int]):
        self.num_prefix_tokens = num_prefix_tokens
        self.map_hw = map_hw

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.map_hw
        x = x[:, self.num_prefix_tokens:, :]
        return x.reshape(x.shape[0], h, w, x.shape[-1]).permute(0, 3, 1, 2)


class ChannelsLastToFirst:
    """Reshape transform for NHWC outputs (timm Swin and friends): (N, h, w, C) -> (N, C, h, w)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


def _size_kwargs(name: str, image_size: int) -> dict[str, Any]:
    # Models with a fixed input size (ViT, Swin, ...) build position embeddings for img_size; CNNs
    # take any size and reject the keyword.
    cfg = timm.get_pretrained_cfg(name, allow_unregistered=True)
    if cfg is not None and getattr(cfg, "fixed_input_size", False):
        return {"img_size": image_size}
    return {}


def _short(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:300]


def build_model(model_cfg: Any, num_classes: int, image_size: int) -> nn.Module:
    """``timm.create_model`` for ``model_cfg`` (name, pretrained, weights) with a ``num_classes`` head.

    ``model.pretrained=true``: weights already in the cache (:mod:`proxyattention.weights`: fetched with
    ``python -m proxyattention.data weights``) are loaded from there without asking the hub, so a cell
    on a node without internet, and every cell of a sweep, starts from the same file; otherwise timm
    downloads them.

    Raises :class:`ModelSetupError` for an unknown ``model.name``, weights that cannot be fetched
    (offline ``model.pretrained=true``) and an unreadable or mismatched ``model.weights`` file.
    """
    name = model_cfg.name
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean: {', '.join(close)}" if close else "; see timm.list_models()"
        raise ModelSetupError(f"model.name={name!r} is not a timm model{hint}")
    kwargs = dict(num_classes=num_classes, **_size_kwargs(name, image_size))
    if model_cfg.pretrained:
        cached = weights.cached_path(weights.locate(name))
        if cached is not None:
            kwargs["pretrained_cfg_overlay"] = {"file": str(cached)}
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:
            # Tell a failed download apart from a model that cannot be built at all.
            kwargs.pop("pretrained_cfg_overlay", None)
            timm.create_model(name, pretrained=False, **kwargs)
            if cached is not None:
                raise ModelSetupError(f"the cached pretrained weights of {name!r} ({cached}) do not load "
                                      f"({_short(e)}); put a good file there with "
                                      f"`{weights.COMMAND} --from-file {name}=FILE`") from None
            raise ModelSetupError(
                f"pretrained weights for {name!r} could not be fetched ({_short(e)}); fetch them with "
                f"`{weights.COMMAND} {name}` on a machine with internet (same HF_HOME), or use "
                "model.pretrained=false, or model.weights=PATH to load a local checkpoint") from None
        log.info("model %s: pretrained weights from %s", name,
                 cached if cached is not None else "the hub (downloaded)")
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    if model_cfg.weights:
        load_weights(model, model_cfg.weights)
    return model


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    head = cfg.get("classifier") if isinstance(cfg, dict) else None
    heads = head if isinstance(head, (list, tuple)) else [head] if head else []
    return tuple(f"{h}." for h in heads)


def load_weights(model: nn.Module, path: str) -> None:
    """Load a local state dict (raw, or under ``state_dict`` / ``model``) into ``model``.

    A classifier head whose shape differs (another number of classes) is left as initialised and the
    skipped keys are logged; any other mismatch is a :class:`ModelSetupError`.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelSetupError(f"model.weights={path!r}: no such file")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelSetupError(f"model.weights={path!r} could not be read as a torch state dict "
                              f"({_short(e)})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ModelSetupError(f"model.weights={path!r} holds a {type(state).__name__}, not a state dict")
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}

    own = model.state_dict()
    heads = _classifier_prefixes(model)
    skipped = [k for k, v in state.items()
               if k.startswith(heads) and k in own and tuple(v.shape) != tuple(own[k].shape)]
    state = {k: v for k, v in state.items() if k not in skipped}
    wrong_shape = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state and k not in skipped]
    unexpected = [k for k in state if k not in own]
    if wrong_shape or missing or unexpected:
        parts = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for label, keys in (("shape differs", wrong_shape), ("missing", missing),
                                     ("unexpected", unexpected)) if keys]
        raise ModelSetupError(f"model.weights={path!r} does not fit model {type(model).__name__} "
                              f"({'; '.join(parts)}); check model.name matches the checkpoint")
    model.load_state_dict(state, strict=False)
    if skipped:
        log.info("model.weights=%s: classifier head not loaded (other number of classes): %s",
                 path, ", ".join(skipped))


def _probe(model: nn.Module, names: list[str], image_size: int) -> dict[str, tuple[int, ...]]:
    """Output shapes of the named modules for one dummy input of the configured size."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name in names:
        def hook(module: nn.Module, args: Any, output: Any, name: str = name) -> None:
            if isinstance(output, torch.Tensor) and name not in shapes:
                shapes[name] = tuple(output.shape)
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    training = {m: m.training for m in model.modules()}
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        for m, mode in training.items():
            m.training = mode
    return shapes


def _token_grid(model: nn.Module, image_size: int, num_tokens: int) -> tuple[int, int]:
    patch_embed = getattr(model, "patch_embed", None)
    grid = None
    if patch_embed is not None and hasattr(patch_embed, "dynamic_feat_size"):
        grid = tuple(patch_embed.dynamic_feat_size((image_size, image_size)))
    elif patch_embed is not None and getattr(patch_embed, "grid_size", None) is not None:
        grid = tuple(patch_embed.grid_size)
    if grid is None or grid[0] * grid[1] != num_tokens:
        side = round(num_tokens ** 0.5)
        if side * side != num_tokens:
            raise ModelSetupError(f"cannot lay {num_tokens} tokens of {type(model).__name__} out on a "
                                  "patch grid; set model.target_layer to a layer with a spatial map")
        grid = (side, side)
    return int(grid[0]), int(grid[1])


def _describe(model: nn.Module, name: str, shape: tuple[int, ...], image_size: int) -> TargetLayer:
    module = model.get_submodule(name)
    if len(shape) == 3:  # (N, tokens, C)
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        hw = _token_grid(model, image_size, shape[1] - prefix)
        return TargetLayer(name, module, hw, "tokens", prefix)
    if len(shape) == 4:
        if getattr(model, "output_fmt", "NCHW") == "NHWC":
            return TargetLayer(name, module, (shape[1], shape[2]), "NHWC")
        return TargetLayer(name, module, (shape[2], shape[3]), "NCHW")
    raise ModelSetupError(f"model.target_layer={name!r} outputs shape {shape}, not a spatial map "
                          "(N, C, h, w) or tokens (N, T, C); choose another layer")


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None)
    return (cfg.get("architecture") if isinstance(cfg, dict) else None) or type(model).__name__


def find_target_layer(model: nn.Module, image_size: int, name: Optional[str] = None) -> TargetLayer:
    """The layer a CAM explains for inputs of ``image_size`` x ``image_size``.

    name: a module path (``model.target_layer``) or None for the automatic choice (see module doc).
    Raises :class:`ModelSetupError` when the map would be too small to give a non-constant CAM.
    """
    model_name = _model_name(model)
    modules = dict(model.named_modules())
    if name:
        if name not in modules:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
            stages = [i["module"] for i in getattr(model, "feature_info", [])]
            hint = ", ".join(dict.fromkeys(close + stages[::-1][:5])) or ", ".join(list(modules)[1:6])
            raise ModelSetupError(f"model.target_layer={name!r} is not a module of {model_name}; "
                                  f"valid names include: {hint}")
        shape = _probe(model, [name], image_size).get(name)
        if shape is None:
            raise ModelSetupError(f"model.target_layer={name!r} does not run (or outputs no tensor) "
                                  f"in a forward pass of {model_name}; choose another layer")
        target = _describe(model, name, shape, image_size)
        if min(target.map_hw) < MIN_NAMED_MAP:
            raise ModelSetupError(
                f"model.target_layer={name!r} of model.name={model_name} has a "
                f"{target.map_hw[0]}x{target.map_hw[1]} map at dataset.image_size={image_size}, which "
                "gives a constant CAM; choose an earlier layer or a larger dataset.image_size")
        return target

    stages = [i["module"] for i in getattr(model, "feature_info", []) if i.get("module") in modules]
    if not stages:
        stages = [n for n, m in model.named_modules() if n and not list(m.children())]
    shapes = _probe(model, stages, image_size)
    ran = [n for n in stages if n in shapes and len(shapes[n]) in (3, 4)]
    if ran and len(shapes[ran[-1]]) == 3:  # token model: explain the last block's norm1
        last = ran[-1]
        candidate = f"{last}.norm1" if f"{last}.norm1" in modules else last
        shape = _probe(model, [candidate], image_size)[candidate] if candidate != last else shapes[last]
        chosen = [_describe(model, candidate, shape, image_size)]
    else:
        chosen = [_describe(model, n, shapes[n], image_size) for n in ran if len(shapes[n]) == 4]
    ok = [t for t in chosen if min(t.map_hw) >= MIN_DEFAULT_MAP]
    if not ok:
        sizes = ", ".join(f"{t.name} {t.map_hw[0]}x{t.map_hw[1]}" for t in chosen) or "none found"
        raise ModelSetupError(
            f"model.name={model_name} has no layer with a map of at least {MIN_DEFAULT_MAP}x"
            f"{MIN_DEFAULT_MAP} at dataset.image_size={image_size} ({sizes}); use a larger "
            "dataset.image_size, or set model.target_layer to a layer with at least a 2x2 map")
    target = ok[-1]
    log.debug("CAM target layer for %s at %d px: %s (%dx%d)", model_name, image_size, target.name,
              *target.map_hw)
    return target


def reshape_transform_for(model: nn.Module, target: TargetLayer) -> Optional[Callable]:
    """The callable that turns ``target``'s output into (N, C, h, w), or None when it already is."""
    if target.layout == "tokens":
        return TokensToMap(target.num_prefix_tokens, target.map_hw)
    if target.layout == "NHWC":
        return ChannelsLastToFirst()
    return None
