"""Datasets, the split, augmentation and the proxy overlay."""

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from proxyattention.config import DatasetConfig
from proxyattention.data import (DataError, ImageBank, ProxyOverlay, augment, load_or_make_split,
                                 load_samples, make_split, open_rgb)


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


def test_overlay_replaces_only_its_indices_and_round_trips():
    ov = ProxyOverlay(torch.device("cpu"))
    imgs = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    ov.update(torch.tensor([7, 3]), torch.stack([torch.full((3, 2, 2), 7, dtype=torch.uint8),
                                                  torch.full((3, 2, 2), 3, dtype=torch.uint8)]))
    out = ov.apply(torch.tensor([1, 3, 7, 9]), imgs)
    assert out[:, 0, 0, 0].tolist() == [0, 3, 7, 0]
    assert imgs.sum() == 0  # the originals are untouched
    ov.update(torch.tensor([3, 5]), torch.full((2, 3, 2, 2), 9, dtype=torch.uint8))
    assert ov.index.tolist() == [3, 5, 7]
    assert ov.apply(torch.tensor([3, 5, 7]), imgs[:3])[:, 0, 0, 0].tolist() == [9, 9, 7]
    again = ProxyOverlay(torch.device("cpu"))
    again.load_state_dict(ov.state_dict())
    assert torch.equal(again.index, ov.index) and torch.equal(again.images, ov.images)
    ov.clear()
    assert len(ov) == 0 and torch.equal(ov.apply(torch.tensor([3]), imgs[:1]), imgs[:1])
