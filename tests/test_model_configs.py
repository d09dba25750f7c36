"""Every dataset x model config composes and validates; every thesis model explains a non-constant map.

The CAM checks build each thesis model at the thesis's input size (224 px) with random weights
(``pretrained=false``) from its ``conf/model`` file, pick its target layer as a trial does and compute a
GradCAM++ map. vgg16 and ViT-B/16 are large, so those checks are marked slow (about 60 s for all five
on 2 CPU cores, most of it vgg16).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from proxyattention.config import register_configs, to_trial_config

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
DATASETS = sorted(p.stem for p in (CONF / "dataset").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
THESIS_MODELS = {"resnet18": 128, "resnet50": 32, "efficientnet_b0": 64, "vgg16": 16,
                 "vit_base_patch16_224": 16}
THESIS_DATASETS = ("cifar100", "caltech101", "places256", "stanford_dogs", "tsinghua_dogs",
                   "asl_alphabet", "plant_disease")


def compose_all(override_lists):
    """Compose many trials under one Hydra initialisation (initialising costs more than composing)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return [compose(config_name="config", overrides=list(o)) for o in override_lists]


def compose_trial(*overrides: str):
    return compose_all([overrides])[0]


def test_every_thesis_dataset_and_model_has_a_config():
    assert set(THESIS_DATASETS) | {"imagefolder", "shapes"} <= set(DATASETS)
    assert set(THESIS_MODELS) <= set(MODELS)


@pytest.mark.parametrize("dataset", DATASETS)
def test_every_dataset_composes_with_every_model(dataset):
    extra = ["dataset.root=/data/somewhere"] if dataset == "imagefolder" else []
    cfgs = compose_all([[f"dataset={dataset}", f"model={model}", *extra] for model in MODELS])
    for model, cfg in zip(MODELS, cfgs):
        trial = to_trial_config(cfg)  # merges onto the schema and validates
        assert trial.dataset.name == (dataset if dataset != "imagefolder" else "imagefolder")
        assert trial.model.name == model


@pytest.mark.parametrize("dataset", THESIS_DATASETS)
def test_thesis_datasets_use_the_thesis_input_size_and_class_count(dataset):
    d = compose_trial(f"dataset={dataset}").dataset
    assert d.image_size == 224 and d.num_classes is not None and d.root


def test_thesis_model_batch_sizes_amp_and_defaults():
    cfgs = compose_all([[f"model={model}"] for model in THESIS_MODELS])
    for (model, batch), cfg in zip(THESIS_MODELS.items(), cfgs):
        m = cfg.model
        assert m.batch_size == batch and m.pretrained is False and m.weights is None
        assert m.amp is (model != "vit_base_patch16_224")


def test_imagefolder_needs_a_root():
    with pytest.raises(Exception, match="root"):
        to_trial_config(compose_trial("dataset=imagefolder"))


def _model_cfg(name: str):
    return OmegaConf.merge(compose_trial(f"model={name}").model, {"pretrained": False})


def _check_cam(name: str, image_size: int = 224) -> None:
    from proxyattention.cam import compute_cams
    from proxyattention.models import build_model, find_target_layer

    mcfg = _model_cfg(name)
    torch.manual_seed(0)
    model = build_model(mcfg, num_classes=7, image_size=image_size)
    target = find_target_layer(model, image_size, mcfg.target_layer)
    if mcfg.target_layer:
        assert target.name == mcfg.target_layer
    assert min(target.map_hw) >= 2
    images = torch.randn(2, 3, image_size, image_size)
    cams = compute_cams(model, images, torch.tensor([0, 3]), "gradcampp", target)
    assert cams.shape == (2, image_size, image_size)
    assert float(cams.min()) >= 0 and float(cams.max()) <= 1
    for cam in cams:
        assert float(cam.std()) > 1e-3, f"{name}: constant CAM from {target.name}"


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "efficientnet_b0"])
def test_thesis_cnn_gives_a_non_constant_cam_at_224(name):
    _check_cam(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg16", "vit_base_patch16_224"])
def test_large_thesis_model_gives_a_non_constant_cam_at_224(name):
    _check_cam(name)


def test_resnet18_default_still_explains_the_32px_demo():
    _check_cam("resnet18", image_size=32)


def test_pretrained_without_cached_weights_fails_at_once_naming_the_fix(tmp_path):
    """Offline with an empty weight cache: a ModelSetupError naming the two overrides, no traceback
    from a download library."""
    code = ("from types import SimpleNamespace as N\n"
            "from proxyattention.models import build_model, ModelSetupError\n"
            "try:\n"
            "    build_model(N(name='resnet18', pretrained=True, weights=None), 10, 224)\n"
            "except ModelSetupError as e:\n"
            "    print('MSG', e)\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"),
           "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "MSG" in r.stdout, r.stdout + r.stderr
    assert "model.pretrained=false" in r.stdout and "model.weights=PATH" in r.stdout
