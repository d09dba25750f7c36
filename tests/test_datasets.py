"""The thesis datasets without a network: tiny copies in each loader's exact on-disk format.

torchvision's own loaders (CIFAR100, Caltech101, Places365) read every fixture, md5 checks included:
the fixtures' checksums are put where torchvision keeps the real ones, so the integrity code runs for
real. A socket guard makes any network access an immediate failure.
"""

import hashlib
import io
import logging
import os
import pickle
import socket
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from proxyattention.config import DatasetConfig
from proxyattention.data import cli as datacli
from proxyattention.data.bank import ImageBank
from proxyattention.data.registry import load_samples
from proxyattention.data.samples import DataError
from proxyattention.data.shapes import SHAPE_CLASSES, SHAPES_PER_CLASS, shape_masks
from proxyattention.data.split import load_or_make_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network access in a test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def ds_cfg(tmp_path, **kw):
    return OmegaConf.structured(DatasetConfig(cache_dir=str(tmp_path / "cache"), **kw))


def md5(path) -> str:
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def tree(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs} | \
           {os.path.relpath(d, root) for d, _, _ in os.walk(root)}


# ------------------------------------------------------------------------------------------ CIFAR-100

def make_cifar100(root, monkeypatch, n_classes=5, per_class=(4, 2)):
    """A cifar-100-python.tar.gz as on the Toronto server: pickled dicts of uint8 rows (N, 3072)."""
    from torchvision.datasets import CIFAR100

    rng = np.random.default_rng(0)
    src = root / "build" / "cifar-100-python"
    src.mkdir(parents=True)
    names = [f"class{c:02d}" for c in range(n_classes)]
    arrays = {}
    for part, n in zip(("train", "test"), per_class):
        labels = np.repeat(np.arange(n_classes), n).tolist()
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        arrays[part] = (data, labels)
        with open(src / part, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * len(labels),
                         "filenames": [f"{i}.png" for i in range(len(labels))]}, f)
    with open(src / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": ["all"]}, f)
    archive = root / "data" / CIFAR100.filename
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-100-python")
    # The fixture's checksums where torchvision keeps the real ones: the md5 checks still run.
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5(src / "train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5(src / "test")]])
    monkeypatch.setattr(CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names",
                                           "md5": md5(src / "meta")})
    monkeypatch.setattr(CIFAR100, "tgz_md5", md5(archive))
    return archive.parent, names, arrays


def test_cifar100_reads_the_archive_offline_with_the_official_test_split(tmp_path, monkeypatch):
    root, names, arrays = make_cifar100(tmp_path, monkeypatch)
    s = load_samples(ds_cfg(tmp_path, name="cifar100", source="cifar100", root=str(root), num_classes=5))
    assert s.classes == names and len(s) == 30 and s.images.shape == (30, 32, 32, 3)
    # torchvision's layout: rows are CHW planes; the first training image comes back as HWC
    assert np.array_equal(s.images[0], arrays["train"][0][0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert s.official_test.sum() == 10 and s.official_test[20:].all()
    split = load_or_make_split(s, ds_cfg(tmp_path), seed=0)
    assert np.array_equal(split.test, np.arange(20, 30))  # the official test split is the test set
    bank = ImageBank(s, 48, torch.device("cpu"), "no", 1, 0)  # too big for "memory": resized per batch
    assert not bank.in_memory and bank.get(torch.tensor([0, 29])).shape == (2, 3, 48, 48)


def test_cifar100_prepare_runs_torchvisions_download_path_on_a_local_archive(tmp_path, monkeypatch, capsys):
    root, names, _ = make_cifar100(tmp_path, monkeypatch)
    # download=True: torchvision finds the archive, checks its md5, unpacks it; no socket is opened.
    assert datacli.prepare("cifar100", str(root), download=True, cache_dir=str(tmp_path / "cache")) == 0
    out = capsys.readouterr().out
    assert "5 classes, 30 images" in out and "class04" in out and "train" in out
    assert (root / "cifar-100-python" / "train").is_file()
    assert list((tmp_path / "cache" / "manifests").glob("*.json"))


def test_cifar100_missing_offline_says_the_exact_fix(tmp_path, monkeypatch):
    empty = tmp_path / "nothing"
    with pytest.raises(DataError) as e:
        load_samples(ds_cfg(tmp_path, name="cifar100", source="cifar100", root=str(empty)))
    msg = str(e.value)
    assert f"python -m proxyattention.data prepare cifar100 {empty}" in msg and "dataset.root" in msg
    assert not empty.exists()  # looking did not create the folder


def test_cifar100_download_failure_is_a_data_error_not_a_traceback(tmp_path, monkeypatch):
    make_cifar100(tmp_path, monkeypatch)
    with pytest.raises(DataError, match="download .* failed.*cifar-100-python.tar.gz"):
        load_samples(ds_cfg(tmp_path, name="cifar100", source="cifar100", root=str(tmp_path / "empty"),
                            download=True))


def test_cifar100_corrupt_file_fails_its_md5_check(tmp_path, monkeypatch):
    root, _, _ = make_cifar100(tmp_path, monkeypatch)
    cfg = ds_cfg(tmp_path, name="cifar100", source="cifar100", root=str(root))
    load_samples(cfg)
    with open(root / "cifar-100-python" / "test", "ab") as f:
        f.write(b"\0")
    with pytest.raises(DataError, match="md5"):
        load_samples(cfg)


# ----------------------------------------------------------------------------------------- Caltech101

def make_caltech101(root):
    """caltech101/101_ObjectCategories/<category>/image_0001.jpg …, as caltech-101.zip unpacks."""
    cats = {"BACKGROUND_Google": 2, "Faces_easy": 3, "accordion": 2, "airplanes": 4}
    base = root / "caltech101" / "101_ObjectCategories"
    for c, n in cats.items():
        (base / c).mkdir(parents=True)
        for i in range(1, n + 1):
            mode = "L" if (c, i) == ("accordion", 2) else "RGB"  # Caltech101 has grayscale images
            Image.new(mode, (30 + i, 20), 90 if mode == "L" else (i * 40, 10, 200)).save(
                base / c / f"image_{i:04d}.jpg")
    return root


def test_caltech101_through_torchvision_has_no_background_class(tmp_path):
    root = make_caltech101(tmp_path / "data")
    s = load_samples(ds_cfg(tmp_path, name="caltech101", source="caltech101", root=str(root)))
    assert s.classes == ["Faces_easy", "accordion", "airplanes"] and len(s) == 9
    assert s.official_test is None and s.labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert all(os.path.isfile(p) for p in s.paths)
    imgs = ImageBank(s, 16, torch.device("cpu"), "yes", 64, 0).get(torch.arange(9))
    assert imgs.shape == (9, 3, 16, 16)
    assert imgs[4].float().std(0).max() == 0  # the grayscale image became gray RGB
    train, val, test = (load_or_make_split(s, ds_cfg(tmp_path), 0).__dict__[k] for k in ("train", "val", "test"))
    assert len(train) + len(val) + len(test) == 9


def test_caltech101_missing_leaves_no_folder_behind(tmp_path):
    root = tmp_path / "typo"
    with pytest.raises(DataError, match="prepare caltech101"):
        load_samples(ds_cfg(tmp_path, name="caltech101", source="caltech101", root=str(root)))
    assert not root.exists()


# ------------------------------------------------------------------------------------------ Places365

def make_places365(root, monkeypatch):
    """Places365-Standard small: devkit text files (md5-checked) + data_256_standard/ and val_256/."""
    from torchvision.datasets import Places365

    cats = ["/a/airfield", "/b/bakery/shop", "/c/canyon"]
    root.mkdir(parents=True)
    (root / "categories_places365.txt").write_text("".join(f"{c} {i}\n" for i, c in enumerate(cats)))
    train_lines, val_lines = [], []
    for i, c in enumerate(cats):
        for k in range(1, 4):
            rel = f"{c}/{k:08d}.jpg"
            train_lines.append(f"{rel} {i}\n")
            p = root / "data_256_standard" / rel.lstrip("/")
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (256, 256), (i * 80, k * 60, 30)).save(p)
        name = f"Places365_val_{i + 1:08d}.jpg"
        val_lines.append(f"{name} {i}\n")
        (root / "val_256").mkdir(exist_ok=True)
        Image.new("RGB", (256, 256), (i * 80, 0, 0)).save(root / "val_256" / name)
    (root / "places365_train_standard.txt").write_text("".join(train_lines))
    (root / "places365_val.txt").write_text("".join(val_lines))
    monkeypatch.setattr(Places365, "_CATEGORIES_META",
                        ("categories_places365.txt", md5(root / "categories_places365.txt")))
    monkeypatch.setitem(Places365._FILE_LIST_META, "train-standard",
                        ("places365_train_standard.txt", md5(root / "places365_train_standard.txt")))
    monkeypatch.setitem(Places365._FILE_LIST_META, "val", ("places365_val.txt", md5(root / "places365_val.txt")))
    return root, cats


def test_places256_reads_places365_small_with_val_as_test(tmp_path, monkeypatch):
    root, cats = make_places365(tmp_path / "places", monkeypatch)
    s = load_samples(ds_cfg(tmp_path, name="places256", source="places365", root=str(root), num_classes=3))
    assert s.classes == cats and len(s) == 12
    assert s.official_test.tolist() == [False] * 9 + [True] * 3
    assert s.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 1, 2]
    assert all(os.path.isfile(p) for p in s.paths)
    assert ImageBank(s, 8, torch.device("cpu"), "yes", 64, 0).get(torch.arange(12)).shape == (12, 3, 8, 8)


def test_places365_corrupt_file_list_fails_its_md5_check(tmp_path, monkeypatch):
    root, _ = make_places365(tmp_path / "places", monkeypatch)
    with open(root / "places365_val.txt", "a") as f:
        f.write("Places365_val_00000009.jpg 1\n")
    with pytest.raises(DataError, match="places365_val.txt .*corrupted.*prepare places256"):
        load_samples(ds_cfg(tmp_path, name="places256", source="places365", root=str(root)))


def test_places365_missing_names_the_files(tmp_path):
    with pytest.raises(DataError, match="categories_places365.txt.*prepare places256"):
        load_samples(ds_cfg(tmp_path, name="places256", source="places365", root=str(tmp_path)))


# ------------------------------------------------------------------------------- messy ImageFolder

def make_messy_folder(root):
    """Every kind of file a scraped dataset holds, in two classes plus an empty one."""
    for c in ("cat", "dog", "empty_class"):
        (root / c).mkdir(parents=True)
    Image.new("RGB", (12, 10), (200, 10, 10)).save(root / "cat" / "rgb.jpg")
    Image.new("L", (12, 10), 128).save(root / "cat" / "gray.png")
    Image.new("RGBA", (12, 10), (255, 0, 0, 128)).save(root / "cat" / "rgba.png")
    Image.new("CMYK", (12, 10), (0, 255, 0, 0)).save(root / "dog" / "cmyk.jpg")
    Image.new("P", (12, 10), 3).save(root / "dog" / "palette.gif")
    Image.new("RGB", (12, 10), (1, 2, 3)).save(root / "dog" / "rgb.bmp")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "dog" / "labels.csv").write_text("not,an,image\n")
    return root


def test_imagefolder_messy_files_are_each_reported_and_handled(tmp_path, caplog, capsys):
    root = make_messy_folder(tmp_path / "pets")
    before = tree(root)
    cfg = ds_cfg(tmp_path, name="pets", source="imagefolder", root=str(root))
    with caplog.at_level(logging.WARNING):
        s = load_samples(cfg)
    assert s.classes == ["cat", "dog"] and len(s) == 7  # the broken jpg is still listed: nothing checked it yet
    log_text = caplog.text
    assert "1 non-image files skipped" in log_text and "labels.csv" in log_text
    assert "1 folders" in log_text and "empty_class" in log_text

    report = datacli.verify(cfg, progress=False)
    out = capsys.readouterr().out
    assert [u["path"] for u in report["unreadable"]] == [str(root / "dog" / "broken.jpg")]
    assert str(root / "dog" / "broken.jpg") in out and "unreadable images (left out of every trial until fixed): 1" in out
    assert sorted(report["non_rgb"]) == ["CMYK", "L", "P", "RGBA"] and "mode CMYK: 1" in out
    assert "labels.csv" in out and "empty_class" in out
    assert "cat" in out and "per split" in out
    assert tree(root) == before  # verify wrote nothing into the dataset folder
    manifest = datacli.manifest_path(cfg)
    assert manifest.is_file() and str(tmp_path / "cache") in str(manifest)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        s2 = load_samples(cfg)  # the unreadable file verify found is left out, with a warning
    assert len(s2) == 6 and not any(p.endswith("broken.jpg") for p in s2.paths)
    assert "leaving out 1 unreadable files" in caplog.text and str(manifest) in caplog.text
    assert s2.fingerprint != s.fingerprint
    imgs = ImageBank(s2, 8, torch.device("cpu"), "yes", 64, 0).get(torch.arange(6))
    assert imgs.shape == (6, 3, 8, 8)
    assert tree(root) == before


def test_manifest_notices_a_dataset_changed_under_a_sweep(tmp_path, caplog):
    root = make_messy_folder(tmp_path / "pets")
    (root / "dog" / "broken.jpg").unlink()
    cfg = ds_cfg(tmp_path, name="pets", source="imagefolder", root=str(root))
    load_samples(cfg)  # the first trial records the manifest
    with caplog.at_level(logging.WARNING):
        load_samples(cfg)
    assert "changed" not in caplog.text

    Image.new("RGB", (12, 10)).save(root / "cat" / "new.png")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_samples(cfg)
    assert "dataset pets" in caplog.text and "cat 3→4" in caplog.text and "images 6→7" in caplog.text

    (root / "cat" / "new.png").unlink()
    Image.new("RGB", (40, 40), (9, 9, 9)).save(root / "cat" / "rgb.jpg")  # same count, new content
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_samples(cfg)
    assert "dataset pets" in caplog.text and "replaced, renamed or resized" in caplog.text
    assert "python -m proxyattention.data verify" in caplog.text

    datacli.verify(cfg, progress=False, out=io.StringIO())  # accepting the new state
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_samples(cfg)
    assert "changed" not in caplog.text


def test_imagefolder_official_train_test_folders(tmp_path):
    for part, n in (("train", 3), ("test", 2)):
        for c in ("a", "b"):
            (tmp_path / "d" / part / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8)).save(tmp_path / "d" / part / c / f"{i}.png")
    s = load_samples(ds_cfg(tmp_path, source="imagefolder", root=str(tmp_path / "d")))
    assert s.classes == ["a", "b"] and s.official_test.sum() == 4
    report = datacli.verify(ds_cfg(tmp_path, source="imagefolder", root=str(tmp_path / "d")),
                            progress=False, out=io.StringIO())
    assert report["split"]["test"] == 4 and not report["empty_dirs"]


def test_verify_checks_many_files_in_a_process_pool(tmp_path):
    root = tmp_path / "many"
    for c in range(4):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(600):
            Image.new("RGB" if i % 100 else "L", (4, 4)).save(root / f"c{c}" / f"{i}.png")
    (root / "c0" / "bad.png").write_bytes(b"\x89PNG garbage")
    report = datacli.verify(ds_cfg(tmp_path, source="imagefolder", root=str(root)), workers=2,
                            progress=False, out=io.StringIO(), per_class=False)
    assert report["summary"]["images"] == 2401
    assert [u["path"] for u in report["unreadable"]] == [str(root / "c0" / "bad.png")]
    assert len(report["non_rgb"]["L"]) == 24


def test_cli_verify_and_prepare_instructions(tmp_path, monkeypatch, capsys):
    root = make_messy_folder(tmp_path / "pets")
    env = {**os.environ, "PROXYATTENTION_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "proxyattention.data", "verify", str(root), "--strict"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "broken.jpg" in r.stdout and "2 classes, 7 images" in r.stdout, r.stderr
    # The same entry point in-process (one interpreter start is enough to prove `-m` works).
    monkeypatch.setenv("PROXYATTENTION_DATA", str(tmp_path / "datasets"))
    monkeypatch.setenv("PROXYATTENTION_CACHE", str(tmp_path / "cache"))
    assert datacli.main(["prepare", "stanford_dogs"]) == 1
    out = capsys.readouterr().out
    assert "vision.stanford.edu" in out and "Images/" in out
    assert datacli.main(["verify", "cifar100"]) == 2
    err = capsys.readouterr().err
    assert "prepare cifar100" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------- shapes

def test_shapes_are_deterministic_balanced_and_have_aligned_masks(tmp_path):
    cfg = ds_cfg(tmp_path, name="shapes", source="shapes", image_size=24)
    a, b = load_samples(cfg), load_samples(cfg)
    n = len(SHAPE_CLASSES) * SHAPES_PER_CLASS
    assert len(a) == n and a.images.shape == (n, 24, 24, 3) and a.masks.shape == (n, 24, 24)
    assert np.array_equal(a.images, b.images) and a.fingerprint == b.fingerprint
    assert np.bincount(a.labels).tolist() == [SHAPES_PER_CLASS] * len(SHAPE_CLASSES)
    idx = np.array([5, 0, 77, n - 1])
    assert np.array_equal(shape_masks(cfg, idx), a.masks[idx])
    frac = a.masks.mean(axis=(1, 2))
    assert frac.min() > 0.03 and frac.max() < 0.5  # an object, never the whole image
    # The object has its own colour: pixels inside the mask differ from the background around them.
    inside = a.images[a.masks].astype(float).mean(0)
    assert a.images[~a.masks].std() > 20  # a textured background, not a flat one
    assert inside.shape == (3,)
    fewer = load_samples(ds_cfg(tmp_path, name="shapes", source="shapes", image_size=24, num_classes=3))
    assert fewer.classes == list(SHAPE_CLASSES[:3])


@pytest.mark.slow
def test_shapes_is_learnable_by_a_tiny_model_in_a_few_cpu_epochs(tmp_path):
    """test_resnet, 8 epochs at 32 px on CPU: about 60 s on 2 idle cores (100 s on a busy machine)."""
    from hydra import compose, initialize_config_dir

    from proxyattention.config import register_configs, to_trial_config
    from proxyattention.train import train

    register_configs()
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[
            "dataset=shapes", "model=test_resnet", "proxy=none", "proxy.schedule=8",
            "train.device=cpu", "train.progress=false", f"dataset.cache_dir={tmp_path / 'cache'}"])
    result = train(to_trial_config(cfg), tmp_path / "trial")
    acc = result.get("test/acc", result.get("metrics", {}).get("test/acc"))
    assert acc is not None and acc > 0.5, result  # chance is 0.2
