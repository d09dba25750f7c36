"""Datasets, the split and augmentation."""

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from proxyattention.config import DatasetConfig
from proxyattention.data.bank import ImageBank, open_rgb
from proxyattention.data.registry import load_samples
from proxyattention.data.samples import DataError
from proxyattention.data.split import load_or_make_split, make_split
from proxyattention.data.transforms import augment


def ds_cfg(tmp_path, **kw):
    return OmegaConf.structured(DatasetConfig(cache_dir=str(tmp_path / "cache"), **kw))


def test_digits_are_real_and_embedded(tmp_path):
    s = load_samples(ds_cfg(tmp_path))
    assert len(s) == 1797 and s.images.shape == (1797, 8, 8, 3) and s.images.dtype == np.uint8
    assert s.classes == [str(i) for i in range(10)]
    assert s.images.max() == 255 and len(np.unique(s.images)) > 10


def test_digits_match_scikit_learns_loader(tmp_path):
    from sklearn.datasets import load_digits as sk_digits

    s = load_samples(ds_cfg(tmp_path))
    d = sk_digits()
    assert np.array_equal(s.labels, d.target)
    assert np.array_equal(s.images[..., 1], np.round(d.images / 16 * 255).astype(np.uint8))


def test_split_is_stratified_disjoint_and_deterministic():
    labels = np.repeat(np.arange(5), [100, 60, 40, 20, 7])
    a = make_split(labels, seed=0, val_fraction=0.15, test_fraction=0.15)
    b = make_split(labels, seed=0, val_fraction=0.15, test_fraction=0.15)
    c = make_split(labels, seed=1, val_fraction=0.15, test_fraction=0.15)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    train, val, test = a
    assert len(set(train) & set(val)) == 0 and len(set(train) & set(test)) == 0 and len(set(val) & set(test)) == 0
    assert len(train) + len(val) + len(test) == len(labels)
    for cls, n in zip(range(5), [100, 60, 40, 20, 7]):
        assert abs((labels[test] == cls).sum() - 0.15 * n) <= 1  # stratified per class
        assert (labels[train] == cls).sum() >= 1


def test_official_test_split_is_the_test_set():
    labels = np.tile(np.arange(4), 50)
    official = np.zeros(200, bool)
    official[150:] = True
    train, val, test = make_split(labels, 0, 0.2, 0.3, official)
    assert np.array_equal(test, np.arange(150, 200))
    assert set(train) | set(val) == set(range(150))


def test_split_is_stored_once_and_reused(tmp_path):
    cfg = ds_cfg(tmp_path)
    s = load_samples(cfg)
    first = load_or_make_split(s, cfg, seed=3)
    files = list((tmp_path / "cache" / "splits").glob("*.json"))
    assert len(files) == 1 and "seed3" in files[0].name
    stored = json.loads(files[0].read_text())
    assert stored["train"] == first.train.tolist()
    again = load_or_make_split(s, cfg, seed=3)
    assert np.array_equal(again.test, first.test) and again.fingerprint == first.fingerprint


def _write_images(root):
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    (root / "empty").mkdir()
    Image.new("L", (10, 12), 128).save(root / "cat" / "gray.png")
    Image.new("RGBA", (10, 12), (255, 0, 0, 128)).save(root / "cat" / "rgba.png")
    Image.new("P", (10, 12), 3).save(root / "dog" / "palette.gif")
    Image.new("CMYK", (10, 12), (0, 255, 0, 0)).save(root / "dog" / "cmyk.jpg")
    Image.new("RGB", (10, 12), (1, 2, 3)).save(root / "dog" / "rgb.bmp")
    (root / "dog" / "notes.txt").write_text("not an image")


def test_imagefolder_converts_every_mode_to_rgb(tmp_path):
    _write_images(tmp_path / "data")
    s = load_samples(ds_cfg(tmp_path, name="pets", source="imagefolder", root=str(tmp_path / "data")))
    assert s.classes == ["cat", "dog"] and len(s) == 5  # the .txt file is skipped, not an image
    assert s.labels.tolist() == [0, 0, 1, 1, 1]
    bank = ImageBank(s, 16, torch.device("cpu"), "auto", 64, 0)
    imgs = bank.get(torch.arange(5))
    assert imgs.shape == (5, 3, 16, 16) and imgs.dtype == torch.uint8
    assert imgs[0].float().std(0).max() == 0  # gray stays gray across channels
    cmyk = np.asarray(open_rgb(str(tmp_path / "data" / "dog" / "cmyk.jpg")))
    assert cmyk.shape == (12, 10, 3) and cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 50


def test_unreadable_image_names_its_path(tmp_path):
    _write_images(tmp_path / "data")
    bad = tmp_path / "data" / "cat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    s = load_samples(ds_cfg(tmp_path, source="imagefolder", root=str(tmp_path / "data")))
    with pytest.raises(DataError, match="broken.jpg"):
        ImageBank(s, 16, torch.device("cpu"), "yes", 64, 0)


def test_missing_root_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="dataset.root"):
        load_samples(ds_cfg(tmp_path, source="imagefolder", root=str(tmp_path / "nope")))


def test_streamed_and_in_memory_banks_agree(tmp_path):
    _write_images(tmp_path / "data")
    s = load_samples(ds_cfg(tmp_path, source="imagefolder", root=str(tmp_path / "data")))
    mem = ImageBank(s, 16, torch.device("cpu"), "yes", 64, 0)
    stream = ImageBank(s, 16, torch.device("cpu"), "no", 64, 0)
    assert mem.in_memory and not stream.in_memory
    order = torch.tensor([4, 0, 2, 1, 3])
    a = list(mem.batches(order, 2))
    b = list(stream.batches(order, 2))
    for (ia, xa, ya), (ib, xb, yb) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(xa, xb) and torch.equal(ya, yb)


def test_augment_is_seeded_and_flips_or_rotates():
    x = torch.rand(64, 3, 16, 16)
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    unchanged = (a == x).flatten(1).all(1).float().mean().item()
    assert 0.1 < unchanged < 0.5  # P(no flip, no rotation) = 0.25
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1


def test_persistent_loader_serves_any_order_with_workers(tmp_path):
    """One worker pool for every pass: a second pass in a new order gets the right images, in order."""
    _write_images(tmp_path / "data")
    s = load_samples(ds_cfg(tmp_path, source="imagefolder", root=str(tmp_path / "data")))
    mem = ImageBank(s, 16, torch.device("cpu"), "yes", 64, 0)
    stream = ImageBank(s, 16, torch.device("cpu"), "no", 64, 2)
    assert stream.mode == "files" and stream.num_workers == 2
    for order in (torch.tensor([4, 0, 2, 1, 3]), torch.tensor([3, 3, 1])):
        got = torch.cat([x for _, x, _ in stream.batches(order, 2)])
        assert torch.equal(got, mem.get(order))
    loader = stream._loader
    assert torch.equal(stream.get(torch.tensor([2, 0])), mem.get(torch.tensor([2, 0])))
    assert stream._loader is loader  # the same workers, not a new pool per call


def test_decoded_arrays_too_large_when_resized_stay_at_their_stored_size(tmp_path):
    """CIFAR-100 at 224 px: held at 32 px and resized per batch, the same images as resized once."""
    s = load_samples(ds_cfg(tmp_path))  # digits: 8x8 arrays
    resized_mb = len(s) * 3 * 64 * 64 / 2**20  # ~21 MiB at 64 px; 0.33 MiB stored
    small = ImageBank(s, 64, torch.device("cpu"), "auto", int(resized_mb / 2), 0)
    whole = ImageBank(s, 64, torch.device("cpu"), "auto", int(resized_mb * 2), 0)
    host = ImageBank(s, 64, torch.device("cpu"), "no", None, 0)
    assert (small.mode, whole.mode, host.mode) == ("device-stored", "device", "host")
    assert small.images.shape[-2:] == (8, 8) and small.in_memory and not host.in_memory
    idx = torch.tensor([5, 1700, 3, 3])
    assert torch.equal(small.get(idx), whole.get(idx)) and torch.equal(host.get(idx), whole.get(idx))
    for (i1, x1, y1), (i2, x2, y2) in zip(small.batches(idx, 3), whole.batches(idx, 3)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_memory_budget_follows_free_gpu_memory_and_the_cap(monkeypatch):
    from proxyattention.data.bank import memory_budget

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (15 * 2**30, 16 * 2**30))
    cuda = torch.device("cuda")
    assert memory_budget(cuda, None) == 15 * 2**30 // 4
    assert memory_budget(cuda, 1024) == 2**30
    assert memory_budget(torch.device("cpu"), None) == 2 * 2**30
    assert memory_budget(torch.device("cpu"), 10) == 10 * 2**20


def test_loader_workers_follow_the_cpus_slurm_gives(monkeypatch):
    from proxyattention.data.bank import resolve_workers

    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    assert resolve_workers("auto") == 7
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.setenv("PROXYATTENTION_CPUS", "4")  # the local launcher's threads_per_cell
    assert resolve_workers("auto") == 3
    monkeypatch.delenv("PROXYATTENTION_CPUS")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert resolve_workers("auto") == 2
    assert resolve_workers(0) == 0 and resolve_workers(5) == 5


def test_val_max_caps_validation_alike_per_class_and_the_rest_trains():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=2000)
    train, val, test = make_split(labels, 1, 0.15, 0.15)
    ctrain, cval, ctest = make_split(labels, 1, 0.15, 0.15, val_max=100)
    assert torch.equal(torch.from_numpy(ctest), torch.from_numpy(test))  # the test set never moves
    assert 96 <= len(cval) <= 100 and set(cval) <= set(val)
    assert sorted(np.concatenate([ctrain, cval]).tolist()) == sorted(np.concatenate([train, val]).tolist())
    share = np.bincount(labels[cval], minlength=4) / len(cval)
    assert np.abs(share - np.bincount(labels[val], minlength=4) / len(val)).max() < 0.03
    same = make_split(labels, 1, 0.15, 0.15, val_max=10_000)  # a cap above the size changes nothing
    assert all(np.array_equal(a, b) for a, b in zip(same, (train, val, test)))


def test_normalisation_constants_are_made_once_per_device():
    from proxyattention.data.transforms import IMAGENET_MEAN, _mean_std, normalize

    x = torch.rand(2, 3, 4, 4)
    assert _mean_std(x.device, x.dtype)[0] is _mean_std(x.device, x.dtype)[0]
    expected = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    assert torch.allclose(normalize(x), expected)


def test_training_input_is_augment_then_normalise_in_fewer_passes():
    from proxyattention.data.transforms import normalize, to_float, training_input

    x = (torch.rand(32, 3, 24, 24) * 255).to(torch.uint8)
    expected = normalize(augment(to_float(x), torch.Generator().manual_seed(4)))
    got = training_input(x, torch.Generator().manual_seed(4))
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, normalize(to_float(x)))  # something was flipped or rotated
