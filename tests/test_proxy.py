"""The proxy maths for every mode, against tensors computed by hand."""

import pytest
import torch

from proxyattention.proxy import changed_fraction, choose_subset, make_proxies


@pytest.fixture
def case():
    # One 2-channel 2x2 image; the CAM is high on the top row only.
    images = torch.tensor([[[[0.2, 0.4], [0.6, 0.8]],
                            [[1.0, 0.5], [0.0, 0.25]]]])
    cams = torch.tensor([[[0.9, 0.5], [0.1, 0.0]]])
    return images, cams


def test_blend(case):
    images, cams = case
    out = make_proxies(images, cams, threshold=0.5, weight=0.8, mode="blend")
    expected = torch.tensor([[[[0.2 * (1 - 0.72), 0.4 * (1 - 0.4)], [0.6, 0.8]],
                              [[1.0 * (1 - 0.72), 0.5 * (1 - 0.4)], [0.0, 0.25]]]])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("mode,fill", [
    ("mean", [(0.2 + 0.4 + 0.6 + 0.8) / 4, (1.0 + 0.5 + 0.0 + 0.25) / 4]),
    ("max", [0.8, 1.0]),
    ("min", [0.2, 0.0]),
    ("black", [0.0, 0.0]),
    ("white", [1.0, 1.0]),
])
def test_fill_modes(case, mode, fill):
    images, cams = case
    out = make_proxies(images, cams, threshold=0.5, weight=0.8, mode=mode)
    for c in range(2):
        assert out[0, c, 0, 0].item() == pytest.approx(fill[c])
        assert out[0, c, 0, 1].item() == pytest.approx(fill[c])
        # Below the threshold nothing changes.
        assert torch.equal(out[0, c, 1], images[0, c, 1])


def test_threshold_is_inclusive_and_weight_zero_is_identity(case):
    images, cams = case
    assert torch.equal(make_proxies(images, cams, 0.5, 0.0, "blend"), images)
    out = make_proxies(images, cams, 0.9, 1.0, "black")
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 0, 1] == 0.4


def test_threshold_one_touches_only_the_peak():
    images = torch.rand(3, 3, 8, 8)
    cams = torch.rand(3, 8, 8)
    cams = (cams - cams.amin((1, 2), keepdim=True)) / (cams.amax((1, 2), keepdim=True) - cams.amin((1, 2), keepdim=True))
    out = make_proxies(images, cams, 1.0, 1.0, "white")
    changed = (out != images).any(1)
    assert changed.sum().item() == 3  # one peak pixel per image


def test_changed_fraction(case):
    images, cams = case
    out = make_proxies(images, cams, 0.5, 0.8, "black")
    assert changed_fraction(images, out) == pytest.approx(0.5)


def test_bad_mode_and_shapes(case):
    images, cams = case
    with pytest.raises(ValueError, match="proxy.mode"):
        make_proxies(images, cams, 0.5, 0.5, "grey")
    with pytest.raises(ValueError, match="must match"):
        make_proxies(images, cams[:, :1], 0.5, 0.5, "blend")


def test_subset_is_seeded_sorted_and_sized():
    idx = torch.arange(100, 200)
    a = choose_subset(idx, 0.2, torch.Generator().manual_seed(1))
    b = choose_subset(idx, 0.2, torch.Generator().manual_seed(1))
    c = choose_subset(idx, 0.2, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.numel() == 20 and torch.equal(a, a.sort().values)
    assert set(a.tolist()) <= set(idx.tolist())
    assert choose_subset(idx[:3], 0.1, torch.Generator()).numel() == 1
    assert torch.equal(choose_subset(idx, 1.0, torch.Generator()), idx)
