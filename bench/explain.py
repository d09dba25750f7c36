"""What the CAMs explain, the eigen methods' sign, and the metric convention against pytorch-grad-cam.

A 5-epoch ``test_resnet`` trial on the digits (64 px, schedule ``1,p,1,p,1,p,1,p,1``) is trained once per
``proxy.target``; then, on the model trained with the default target:

- ``mistake_target_wrong_share`` (target 1.0): share of the proxy steps' CAMs that explain a class other
  than the image's true class, with the default ``proxy.target=mistake`` (``predicted``, as the thesis
  did, is printed beside it: its CAMs often explain the right class of images the model meanwhile learned).
- ``eigen_sign_agreement`` (target ≥ 0.95): share of test images whose EigenGradCAM map (native path,
  oriented sign) correlates non-negatively with the GradCAM map; the library's sign is printed beside it.
- ``ad_vs_library_max_abs_diff`` (target ≤ 1e-5): largest difference between this project's Average
  Drop / Average Increase with ``explain.fill=mean`` and pytorch-grad-cam's ``cam_mult_image`` metrics on
  the same model, images and maps.

    python -m bench.explain
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import figure


def trained(target: str):
    """The Trial after its training epochs and proxy steps with ``proxy.target=target`` (as ``train()``
    runs them; the test and explain steps are left out)."""
    from omegaconf import OmegaConf

    from proxyattention import train
    from proxyattention.config import TrialConfig

    cfg = OmegaConf.structured(TrialConfig)
    cfg.model.name, cfg.dataset.image_size, cfg.train.batch_size = "test_resnet", 64, 64
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
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1)


def main() -> None:
    from pytorch_grad_cam.metrics.cam_mult_image import (
        DropInConfidence,
        IncreaseInConfidence,
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    from proxyattention.cam import compute_cams
    from proxyattention.data.transforms import normalize, to_float
    from proxyattention.explain import average_drop, average_increase, confidences

    torch.set_num_threads(max(1, torch.get_num_threads()))
    ours = trained("mistake")
    thesis = trained("predicted")
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
    grad = compute_cams(model, inputs, predicted, "gradcam", layer, impl="native")
    eigen = compute_cams(model, inputs, predicted, "eigengradcam", layer, impl="native")
    library = compute_cams(model, inputs, predicted, "eigengradcam", layer, impl="library")
    oriented = float((correlations(eigen, grad) >= 0).float().mean())
    print(f"EigenGradCAM vs GradCAM on {len(x)} test images, non-negative correlation: oriented sign "
          f"{oriented:.3f}, library sign {float((correlations(library, grad) >= 0).float().mean()):.3f}")
    figure("eigen_sign_agreement", oriented, ">=", 0.95)

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
