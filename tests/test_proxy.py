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


# ------------------------------------------------------------------------------ the compact proxy state

class _Bank:
    """What a proxy step reads from an image bank (batches in order, labels), plus `get` for the checks."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels, self.device = images, labels, images.device

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images[idx]

    def batches(self, order: torch.Tensor, batch_size: int):
        for idx in order.split(batch_size):
            yield idx, self.images[idx], self.labels[idx]


@pytest.fixture(scope="module")
def tiny():
    import timm

    from proxyattention.models import find_target_layer

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4).eval()
    layer = find_target_layer(model, 64, None)
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(40, 3, 64, 64, generator=g) * 255).round().to(torch.uint8)
    labels = torch.randint(0, 4, (40,), generator=g)
    return model, layer, _Bank(images, labels)


def _cfg(clear: bool = True, target: str = "predicted", mode: str = "blend"):
    from proxyattention.config import MethodConfig, ProxyConfig

    return (ProxyConfig(threshold=0.4, weight=0.8, mode=mode, target=target, clear_every_step=clear, log_images=3),
            MethodConfig(name="gradcampp", batch_size=16))


def _old_proxies(model, layer, bank, idx, proxy, method, current=None):
    """Proxies as the step made them before the state was compact: full maps, uint8 images kept."""
    from proxyattention.cam import compute_cams
    from proxyattention.data.transforms import normalize, to_float

    before = bank.get(idx) if current is None else current
    x = to_float(before)
    targets = bank.labels[idx] if proxy.target == "true" else None
    cams = compute_cams(model, normalize(x), targets, method.name, layer, batch_size=method.batch_size)
    return make_proxies(x, cams, proxy.threshold, proxy.weight, proxy.mode).mul(255).round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("mode", ["blend", "mean", "black"])
def test_rebuilt_proxies_equal_the_full_images_within_one_level(tiny, mode):
    from proxyattention.proxy import ProxyState, proxy_step

    model, layer, bank = tiny
    proxy, method = _cfg(mode=mode)
    mistakes = torch.full((40,), -1, dtype=torch.int32)
    wrong = torch.tensor([1, 4, 5, 9, 20, 21, 22, 33, 38])
    mistakes[wrong] = 2
    state = ProxyState(proxy, 64, torch.device("cpu"))
    step = proxy_step(model, bank, state, mistakes, proxy, method, layer, torch.Generator().manual_seed(0))
    assert step.stats["chosen"] == len(wrong) and len(state) == len(wrong)
    expected = _old_proxies(model, layer, bank, wrong, proxy, method)
    rebuilt = state.apply(wrong, bank.get(wrong))
    assert (rebuilt.int() - expected.int()).abs().max().item() <= 1
    others = torch.tensor([0, 2, 3, 39])
    assert torch.equal(state.apply(others, bank.get(others)), bank.get(others))  # originals untouched
    # A mixed batch: proxies where proxied, originals elsewhere, in the batch's own order.
    mixed = torch.tensor([39, 4, 0, 33])
    out = state.apply(mixed, bank.get(mixed))
    assert torch.equal(out[0], bank.get(mixed)[0]) and torch.equal(out[2], bank.get(mixed)[2])
    assert (out[1].int() - expected[1].int()).abs().max() <= 1
    assert step.before.shape[0] == step.after.shape[0] == 3  # only proxy.log_images examples kept


def test_state_is_the_layer_map_not_the_image(tiny):
    from proxyattention.proxy import ProxyState, proxy_step

    model, layer, bank = tiny
    proxy, method = _cfg()
    mistakes = torch.zeros(40, dtype=torch.int32)  # every image wrong (class 0 chosen)
    state = ProxyState(proxy, 64, torch.device("cpu"))
    proxy_step(model, bank, state, mistakes, proxy, method, layer, torch.Generator().manual_seed(0))
    h, w = state.layers[0].maps.shape[1:]
    per_image = state.nbytes() / len(state)
    assert per_image == 8 + 4 * h * w  # the index and a float32 map at the layer's resolution
    assert per_image < 3 * 64 * 64 / 10  # a tenth of a uint8 proxy image, even at 64 px


def test_persisting_proxies_replay_the_chain(tiny):
    from proxyattention.proxy import ProxyState, proxy_step

    model, layer, bank = tiny
    proxy, method = _cfg(clear=False)
    state = ProxyState(proxy, 64, torch.device("cpu"))
    first = torch.full((40,), -1, dtype=torch.int32)
    first[[1, 2, 3]] = 0
    second = torch.full((40,), -1, dtype=torch.int32)
    second[[2, 3, 7]] = 1
    proxy_step(model, bank, state, first, proxy, method, layer, torch.Generator().manual_seed(0))
    once = state.apply(torch.tensor([2, 3]), bank.get(torch.tensor([2, 3])))
    proxy_step(model, bank, state, second, proxy, method, layer, torch.Generator().manual_seed(1))
    assert len(state.layers) == 2 and len(state) == 4
    twice = _old_proxies(model, layer, bank, torch.tensor([2, 3]), proxy, method, current=once)
    got = state.apply(torch.tensor([2, 3]), bank.get(torch.tensor([2, 3])))
    assert (got.int() - twice.int()).abs().max() <= 1  # the second step worked on the first's proxies
    # clear_every_step=true: the second step replaces the first.
    proxy_c, _ = _cfg(clear=True)
    cleared = ProxyState(proxy_c, 64, torch.device("cpu"))
    proxy_step(model, bank, cleared, first, proxy_c, method, layer, torch.Generator().manual_seed(0))
    proxy_step(model, bank, cleared, second, proxy_c, method, layer, torch.Generator().manual_seed(1))
    assert len(cleared.layers) == 1 and len(cleared) == 3
    one = torch.tensor([1])
    assert torch.equal(cleared.apply(one, bank.get(one)), bank.get(one))


def test_state_round_trips_and_mistake_target_explains_the_recorded_class(tiny):
    from proxyattention.proxy import ProxyState, proxy_step

    model, layer, bank = tiny
    proxy, method = _cfg(target="mistake")
    mistakes = torch.full((40,), -1, dtype=torch.int32)
    mistakes[[5, 6]] = torch.tensor([3, 1], dtype=torch.int32)
    state = ProxyState(proxy, 64, torch.device("cpu"))
    step = proxy_step(model, bank, state, mistakes, proxy, method, layer, torch.Generator().manual_seed(0))
    assert 0 <= step.stats["now_correct"] <= 2
    from proxyattention.cam import compute_cams
    from proxyattention.data.transforms import normalize, to_float

    x = to_float(bank.get(torch.tensor([5, 6])))
    cams = compute_cams(model, normalize(x), torch.tensor([3, 1]), "gradcampp", layer)
    expected = make_proxies(x, cams, 0.4, 0.8, "blend").mul(255).round().to(torch.uint8)
    assert (state.apply(torch.tensor([5, 6]), bank.get(torch.tensor([5, 6]))).int() - expected.int()).abs().max() <= 1
    again = ProxyState(proxy, 64, torch.device("cpu"))
    again.load_state_dict(state.state_dict())
    idx = torch.arange(40)
    assert torch.equal(again.apply(idx, bank.get(idx)), state.apply(idx, bank.get(idx)))
    assert again.version == state.version == 1
