"""What the CAMs explain, the eigen methods' sign, and the metric convention against pytorch-grad-cam.

A 5-epoch trial on the digits (``--model``, default ``test_resnet``; 64 px, schedule ``1,p,1,p,1,p,1,p,1``)
is trained once per ``proxy.target``; then, on the model trained with the default target:

- ``mistake_target_wrong_share`` (target 1.0): share of the proxy steps' CAMs that explain a class other
  than the image's true class, with the default ``proxy.target=mistake`` (``predicted``, as the thesis
  did, is printed beside it: its CAMs often explain the right class of images the model meanwhile learned).
- ``eigen_sign_agreement`` (target ≥ 0.97): share of test images on which the native EigenGradCAM's
  sign is the better of the two: its final map correlates more with pytorch-grad-cam's GradCAM map
  (the library's own implementation and post-processing) than the map of the opposite sign does. Images
  where both signs correlate equally (a constant map) decide nothing and are left out (counted). The
  sign rule looks at GradCAM's layer map (cam.py), so this figure checks that its choice holds on the
  final maps; printed beside it, as evidence the rule does not see: the same agreement with HiResCAM's
  and LayerCAM's maps, the library's (LAPACK) sign, and the older figure (share of images whose map
  correlates non-negatively with GradCAM's) with its ceiling: the share for the better sign of each
  image, which no sign rule can exceed (on some images both signs anti-correlate with GradCAM). Then a
  check that uses no CAM at all: on what share of images deleting the top 20% of the chosen map hurts
  the explained class more than deleting the top 20% of the opposite sign's map (and the same for the
  library's sign). A principal component's sign is arbitrary, so every rule orients against some
  reference. Measured at 64 px: on test_resnet (seeds 0, 1), orienting by GradCAM, HiResCAM, LayerCAM or
  GradCAM++ scores 0.96–0.98 against the map the rule uses and 0.84–0.93 against the others; on
  resnet18 (seeds 0, 1), 0.97–1.0 against all four; on test_efficientnet 0.85–0.98 against its own map
  and 0.53–0.90 against the others. Every rule scores alike on the deletion check (test_resnet 0.69–0.81,
  resnet18 0.80–0.88, test_efficientnet 0.58–0.68), so GradCAM, the reference EigenGradCAM's own
  gradients give, is kept.
- ``ad_vs_library_max_abs_diff`` (target ≤ 1e-5): largest difference between this project's Average
  Drop / Average Increase with ``explain.fill=mean`` and pytorch-grad-cam's ``cam_mult_image`` metrics on
  the same model, images and maps.

    python -m bench.explain [--model test_resnet] [--size 64] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import figure


def trained(target: str, model: str = "test_resnet", size: int = 64, seed: int = 0):
    """The Trial after its training epochs and proxy steps with ``proxy.target=target`` (as ``train()``
    runs them; the test and explain steps are left out)."""
    from omegaconf import OmegaConf

    from proxyattention import train
    from proxyattention.config import TrialConfig

    cfg = OmegaConf.structured(TrialConfig)
    cfg.model.name, cfg.dataset.image_size, cfg.train.batch_size = model, size, 64
    cfg.train.seed = seed
    cfg.proxy.schedule, cfg.proxy.target = "1,p,1,p,1,p,1,p,1", target
    cfg.train.progress, cfg.train.checkpoint = False, False
    tmp = tempfile.mkdtemp(prefix="pa-bench-")
    cfg.dataset.cache_dir = f"{tmp}/cache"
    trial = train.set_up(cfg, Path(tmp) / "trial")
    for epoch in trial.remaining_epochs():
        row = train.train_epoch(trial, epoch)
        row.update(train.validate(trial))
        if epoch in trial.proxy_after:
            row.update(train.run_proxy_step(trial, epoch))
        train.end_epoch(trial, epoch, row)
    return trial


def wrong_share(trial) -> float:
    steps = trial.progress.proxy_steps
    chosen = sum(s["chosen"] for s in steps)
    return 1 - sum(s["explained_true"] for s in steps) / max(1, chosen)


def correlations(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,) Pearson correlation of each pair of maps; 0 where either is constant."""
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    norm = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(norm > 0, (a * b).sum(1) / norm.clamp_min(1e-30), torch.zeros_like(norm))


def sign_agreement(chosen: torch.Tensor, flipped: torch.Tensor, reference: torch.Tensor) -> tuple[float, int]:
    """(share of the images where ``chosen`` correlates more with ``reference`` than ``flipped`` does,
    among those where the two differ; how many images were left out as undecided)."""
    a, b = correlations(chosen, reference), correlations(flipped, reference)
    decided = a != b
    return float((a > b)[decided].float().mean()), int((~decided).sum())


DELETED = 0.2  # share of pixels removed by the faithfulness check of the sign


def deletion_sign_check(model, x: torch.Tensor, predicted: torch.Tensor, chosen: torch.Tensor,
                        flipped: torch.Tensor, library_same: torch.Tensor) -> tuple[float, float]:
    """(share of images where deleting the chosen map's top pixels hurts the explained class more than
    deleting the opposite sign's, the same share for the library's sign), among images where it differs."""
    from proxyattention.explain import confidences

    def without_top(maps: torch.Tensor) -> torch.Tensor:
        flat = maps.flatten(1)
        k = max(1, int(DELETED * flat.shape[1]))
        return (flat < flat.topk(k, dim=1).values[:, -1:]).float().view_as(maps)

    _, kept_chosen = confidences(model, x, predicted, without_top(chosen), fill="mean")
    _, kept_flipped = confidences(model, x, predicted, without_top(flipped), fill="mean")
    decided = kept_chosen != kept_flipped
    chosen_wins = kept_chosen < kept_flipped
    library_wins = torch.where(library_same, chosen_wins, ~chosen_wins)
    return float(chosen_wins[decided].float().mean()), float(library_wins[decided].float().mean())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.explain", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="test_resnet", help="model.name (default test_resnet)")
    parser.add_argument("--size", type=int, default=64, help="dataset.image_size (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="train.seed (default 0)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from pytorch_grad_cam.metrics.cam_mult_image import (
        DropInConfidence,
        IncreaseInConfidence,
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    from proxyattention.cam import compute_cams, explain_batch, to_input_size
    from proxyattention.data.transforms import normalize, to_float
    from proxyattention.explain import average_drop, average_increase, confidences

    torch.set_num_threads(max(1, torch.get_num_threads()))
    ours = trained("mistake", args.model, args.size, args.seed)
    thesis = trained("predicted", args.model, args.size, args.seed)
    print(f"model {args.model}, {args.size} px, seed {args.seed}, CAM layer {ours.target_layer.name}")
    figure_value = wrong_share(ours)
    print(f"CAMs explaining a class other than the true one: proxy.target=mistake {figure_value:.3f}, "
          f"proxy.target=predicted {wrong_share(thesis):.3f} (of {sum(s['chosen'] for s in ours.progress.proxy_steps)}"
          f" / {sum(s['chosen'] for s in thesis.progress.proxy_steps)} proxied images)")
    figure("mistake_target_wrong_share", figure_value, "==", 1.0)

    model, layer = ours.model.eval(), ours.target_layer
    x = to_float(ours.data.bank.get(ours.data.test))
    inputs = normalize(x)
    with torch.no_grad():
        predicted = model(inputs).argmax(1)
    refs = {m: compute_cams(model, inputs, predicted, m, layer, impl="library")
            for m in ("gradcam", "hirescam", "layercam")}  # pytorch-grad-cam's own maps
    raw = explain_batch(model, inputs, predicted, "eigengradcam", layer, impl="native", at="layer").maps
    eigen = to_input_size(raw, tuple(inputs.shape[-2:]))
    flipped = to_input_size(-raw, tuple(inputs.shape[-2:]))
    library = compute_cams(model, inputs, predicted, "eigengradcam", layer, impl="library")
    same = (library - eigen).abs().flatten(1).amax(1) <= (library - flipped).abs().flatten(1).amax(1)
    lib_chosen = torch.where(same[:, None, None], eigen, flipped)
    lib_other = torch.where(same[:, None, None], flipped, eigen)
    agreement, undecided = sign_agreement(eigen, flipped, refs["gradcam"])
    others = ", ".join(f"{m} {sign_agreement(eigen, flipped, refs[m])[0]:.3f}" for m in ("hirescam", "layercam"))
    nonneg = float((correlations(eigen, refs["gradcam"]) >= 0).float().mean())
    ceiling = float((torch.maximum(correlations(eigen, refs["gradcam"]),
                                   correlations(flipped, refs["gradcam"])) >= 0).float().mean())
    print(f"EigenGradCAM sign on {len(x)} test images ({undecided} undecided): the better of the two signs "
          f"against GradCAM {agreement:.3f} (library sign {sign_agreement(lib_chosen, lib_other, refs['gradcam'])[0]:.3f}); "
          f"against maps the rule does not see: {others}; non-negative correlation with GradCAM {nonneg:.3f} "
          f"(ceiling over signs {ceiling:.3f})")
    figure("eigen_sign_agreement", agreement, ">=", 0.97)
    mine, lib_faithful = deletion_sign_check(model, x, predicted, eigen, flipped, same)
    print(f"Faithfulness of the sign (no CAM as reference): removing the top {DELETED:.0%} of the chosen map "
          f"lowers the explained class's probability more than removing the top {DELETED:.0%} of the opposite "
          f"sign's map on {mine:.3f} of the images (library's sign {lib_faithful:.3f})")

    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in predicted]
    cams = eigen.numpy()
    drop = DropInConfidence()(inputs, cams, targets, model)
    increase = IncreaseInConfidence()(inputs, cams, targets, model)
    p, o = confidences(model, x, predicted, eigen, fill="mean")
    ad_lib = float(np.mean(drop / p.numpy()) * 100)
    ai_lib = float(np.mean(increase) * 100)
    diff = max(abs(average_drop(p, o) - ad_lib), abs(average_increase(p, o) - ai_lib))
    print(f"Average Drop {average_drop(p, o):.6f} (pytorch-grad-cam {ad_lib:.6f}), Average Increase "
          f"{average_increase(p, o):.4f} (pytorch-grad-cam {ai_lib:.4f})")
    figure("ad_vs_library_max_abs_diff", diff, "<=", 1e-5)


if __name__ == "__main__":
    main()
