"""Explainability metrics on constructed cases whose answers are known, and against pytorch-grad-cam."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from proxyattention.explain import (
    average_drop,
    average_gain,
    average_increase,
    blur,
    choose_images,
    confidences,
    curve_auc,
    energy_pointing,
    explanation_metrics,
    insertion_deletion_curves,
    saliency_rank,
)


def identity(x):
    return x


class RegionModel(nn.Module):
    """Two classes; the class-1 logit depends only on the mean brightness inside ``region``."""

    def __init__(self, region: torch.Tensor, scale: float = 12.0, bias: float = 6.0):
        super().__init__()
        self.register_buffer("region", region.float())
        self.scale, self.bias = scale, bias

    def forward(self, x):
        q = (x.mean(1) * self.region).sum((1, 2)) / self.region.sum()
        return torch.stack([torch.zeros_like(q), self.scale * q - self.bias], 1)


class FractionModel(nn.Module):
    """Two classes; softmax(class 1) = the share of ``region`` pixels that are on (image is 0/1)."""

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.register_buffer("region", region.float())

    def forward(self, x):
        q = ((x.mean(1) * self.region).sum((1, 2)) / self.region.sum()).clamp(1e-9, 1 - 1e-9)
        return torch.stack([torch.log(1 - q), torch.log(q)], 1)


def square(h=8, top=0, left=0, size=4):
    m = torch.zeros(h, h, dtype=torch.bool)
    m[top:top + size, left:left + size] = True
    return m


def test_average_drop_zero_when_map_covers_the_deciding_region():
    region = square()
    model = RegionModel(region)
    images = torch.ones(5, 3, 8, 8)
    labels = torch.ones(5, dtype=torch.long)
    p, o = confidences(model, images, labels, region.float().expand(5, 8, 8), identity)
    assert p.min() > 0.99
    assert average_drop(p, o) == pytest.approx(0.0, abs=1e-6)
    assert average_increase(p, o) == 0.0

    p, o = confidences(model, images, labels, (~region).float().expand(5, 8, 8), identity)
    assert average_drop(p, o) > 99.0  # the region went black: class 1 loses almost all confidence


def test_average_increase_and_gain_on_a_map_that_removes_a_distractor():
    # The class-1 logit falls with brightness outside the region: masking the outside raises o.
    region = square()
    class Distracted(nn.Module):
        def forward(self, x):
            inside = (x.mean(1) * region).sum((1, 2)) / region.sum()
            outside = (x.mean(1) * ~region).sum((1, 2)) / (~region).sum()
            return torch.stack([torch.zeros_like(inside), 2 * inside - 2 * outside], 1)

    images = torch.ones(4, 3, 8, 8)
    labels = torch.ones(4, dtype=torch.long)
    p, o = confidences(Distracted(), images, labels, region.float().expand(4, 8, 8), identity)
    assert torch.allclose(p, torch.full((4,), 0.5))
    expected_o = torch.sigmoid(torch.tensor(2.0))
    assert torch.allclose(o, expected_o.expand(4))
    assert average_increase(p, o) == 100.0
    assert average_gain(p, o) == pytest.approx(float((expected_o - 0.5) / 0.5 * 100), rel=1e-5)
    assert average_drop(p, o) == 0.0


def test_average_gain_handles_certain_predictions():
    p = torch.tensor([1.0, 0.5])
    o = torch.tensor([1.0, 0.75])
    assert average_gain(p, o) == pytest.approx(25.0)


def test_deletion_and_insertion_exact_areas():
    # 8x8 image, a 4x4 region decides; 16 steps of 4 pixels. The perfect map deletes the region in the
    # first 4 steps: p = 1, .75, .5, .25, 0, ... → area 2/16; the inverted map deletes it last → 14/16.
    region = square()
    model = FractionModel(region)
    images = region.float().expand(1, 3, 8, 8).clone()
    labels = torch.ones(1, dtype=torch.long)
    good = region.float().unsqueeze(0)
    bad = 1 - good
    ins_good, del_good = insertion_deletion_curves(model, images, labels, good, steps=16,
                                                   preprocess=identity)
    ins_bad, del_bad = insertion_deletion_curves(model, images, labels, bad, steps=16, preprocess=identity)
    assert torch.allclose(del_good[0, :6], torch.tensor([1, .75, .5, .25, 0, 0]), atol=1e-6)
    assert curve_auc(del_good).item() == pytest.approx(2 / 16, abs=1e-6)
    assert curve_auc(del_bad).item() == pytest.approx(14 / 16, abs=1e-6)
    # Deletion never increases and insertion never decreases when the model is monotone in the pixels.
    for curve in (del_good, del_bad):
        assert (curve[:, 1:] <= curve[:, :-1] + 1e-6).all()
    for curve in (ins_good, ins_bad):
        assert (curve[:, 1:] >= curve[:, :-1] - 1e-6).all()
        assert curve[0, -1].item() == pytest.approx(1.0, abs=1e-6)  # all pixels inserted: the image
    assert curve_auc(ins_good) > curve_auc(ins_bad)


def test_curve_auc_matches_rise_trapezoid():
    curve = torch.tensor([[1.0, 0.5, 0.25, 0.0]])
    assert curve_auc(curve).item() == pytest.approx(np.trapezoid(curve[0].numpy(), dx=1 / 3))


def test_saliency_rank_is_a_permutation_with_stable_ties():
    s = torch.tensor([[[0.5, 0.9], [0.5, 0.1]]])
    assert saliency_rank(s).tolist() == [[[1, 0], [2, 3]]]
    r = saliency_rank(torch.rand(3, 7, 5))
    assert (r.flatten(1).sort(1).values == torch.arange(35)).all()


def test_blur_keeps_constants_and_spreads_an_impulse():
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(blur(flat), flat, atol=1e-6)
    dot = torch.zeros(1, 1, 16, 16)
    dot[..., 8, 8] = 1
    b = blur(dot)
    assert b.sum().item() == pytest.approx(1.0, abs=1e-5) and b.max() < 0.05


def test_energy_pointing():
    s = torch.zeros(2, 4, 4)
    s[0, :2, :2] = 1.0
    s[0, 3, 3] = 1.0
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, :2, :2] = True
    e = energy_pointing(s, masks)
    assert e[0].item() == pytest.approx(0.8) and math.isnan(e[1].item())


def test_metrics_restore_model_mode_and_leave_no_grads():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).train()
    x = torch.rand(6, 3, 12, 12)
    y = torch.randint(0, 3, (6,))
    s = torch.rand(6, 12, 12)
    masks = torch.rand(6, 12, 12) > 0.5
    before = [b.clone() for b in model.buffers()]
    out = explanation_metrics(model, x, y, s, masks, steps=4, batch_size=4)
    assert set(out) == {"explain/ad", "explain/ai", "explain/ag", "explain/insertion", "explain/deletion",
                        "explain/images", "explain/pointing"}
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))  # eval mode: BN stats unchanged


def test_choose_images_is_seeded_and_spread():
    idx = torch.arange(100, 400)
    a, b = choose_images(idx, 50, seed=3), choose_images(idx, 50, seed=3)
    assert torch.equal(a, b) and a.numel() == 50 and a.max() > 300
    assert torch.equal(choose_images(idx, 0, seed=3), idx)


def test_agrees_with_pytorch_grad_cam_confidence_metrics():
    from pytorch_grad_cam.metrics.cam_mult_image import (
        DropInConfidence,
        IncreaseInConfidence,
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    x = torch.randn(16, 3, 10, 10)  # pytorch-grad-cam multiplies the (normalised) input tensor
    y = torch.randint(0, 5, (16,))
    cams = torch.rand(16, 10, 10)
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in y]
    drop = DropInConfidence()(x, cams.numpy(), targets, model)
    increase = IncreaseInConfidence()(x, cams.numpy(), targets, model)

    p, o = confidences(model, x, y, cams, preprocess=identity)
    assert np.allclose((p - o).clamp(min=0).numpy(), drop, atol=1e-6)
    assert np.array_equal((p < o).float().numpy(), increase)
    assert average_drop(p, o) == pytest.approx(float(np.mean(drop / p.numpy()) * 100), rel=1e-5)
    assert average_increase(p, o) == pytest.approx(float(np.mean(increase) * 100))


def test_mean_fill_is_pytorch_grad_cams_convention_on_normalised_images():
    """explain.fill=mean on [0, 1] images == pytorch-grad-cam's cam_mult_image on the normalised tensor."""
    from pytorch_grad_cam.metrics.cam_mult_image import (
        DropInConfidence,
        IncreaseInConfidence,
    )
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    from proxyattention.data.transforms import normalize

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    images = torch.rand(12, 3, 9, 9)
    cams = torch.rand(12, 9, 9)
    with torch.no_grad():
        predicted = model(normalize(images)).argmax(1)  # explain.target=predicted
    targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in predicted]
    drop = DropInConfidence()(normalize(images), cams.numpy(), targets, model)
    increase = IncreaseInConfidence()(normalize(images), cams.numpy(), targets, model)
    p, o = confidences(model, images, predicted, cams, fill="mean")
    library_ad = float(np.mean(drop / p.numpy()) * 100)
    assert abs(average_drop(p, o) - library_ad) <= 1e-5 * max(1.0, library_ad)
    assert abs(average_increase(p, o) - float(np.mean(increase) * 100)) <= 1e-5
    black = confidences(model, images, predicted, cams, fill="black")[1]
    assert not torch.allclose(black, o)  # the two conventions are different numbers
