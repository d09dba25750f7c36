"""Model building and the choice of the CAM layer, on tiny timm models and resnet18 at small sizes."""

import logging

import huggingface_hub.constants
import pytest
import torch
from omegaconf import OmegaConf

from proxyattention.config import ModelConfig
from proxyattention.models import (
    ModelSetupError,
    TargetLayer,
    build_model,
    find_target_layer,
    reshape_transform_for,
)


def model_cfg(name: str, **kw) -> object:
    return OmegaConf.structured(ModelConfig(name=name, **kw))


def no_hooks(model: torch.nn.Module) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
               for m in model.modules())


@pytest.mark.parametrize("image_size, layer, hw", [(32, "layer2", (4, 4)), (64, "layer3", (4, 4)),
                                                   (224, "layer4", (7, 7))])
def test_resnet18_explains_the_deepest_stage_with_a_4x4_map(image_size, layer, hw):
    # timm CNNs reduce 32x: at 32 px layer4 is 1x1 and layer3 2x2, so the choice must be layer2.
    model = build_model(model_cfg("resnet18"), num_classes=10, image_size=image_size)
    target = find_target_layer(model, image_size)
    assert (target.name, target.map_hw, target.layout) == (layer, hw, "NCHW")
    assert target.module is model.get_submodule(layer)
    assert reshape_transform_for(model, target) is None


@pytest.mark.parametrize("name, image_size, layer", [("efficientnet_b0", 64, "blocks.4"),
                                                     ("efficientnet_b0", 224, "blocks.6"),
                                                     ("test_efficientnet", 32, "blocks.2"),
                                                     ("test_resnet", 64, "layer3")])
def test_other_cnns_choose_a_stage_from_feature_info(name, image_size, layer):
    model = build_model(model_cfg(name), num_classes=10, image_size=image_size)
    target = find_target_layer(model, image_size)
    assert target.name == layer
    assert min(target.map_hw) >= 4


def test_choice_leaves_no_hooks_and_keeps_the_train_mode():
    model = build_model(model_cfg("test_resnet"), num_classes=10, image_size=64)
    model.train()
    model.layer1.eval()
    find_target_layer(model, 64)
    assert model.training and model.layer2.training and not model.layer1.training
    assert no_hooks(model)


def test_vit_explains_the_last_norm1_reshaped_to_the_patch_grid():
    model = build_model(model_cfg("test_vit"), num_classes=10, image_size=64)
    target = find_target_layer(model, 64)
    assert (target.name, target.layout, target.map_hw) == ("blocks.5.norm1", "tokens", (4, 4))
    assert target.num_prefix_tokens == model.num_prefix_tokens == 1
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)  # 1 class + 16 patches
    maps = reshape_transform_for(model, target)(tokens)
    assert maps.shape == (2, 3, 4, 4)
    assert torch.equal(maps[1, :, 0, 1], tokens[1, 2])  # patch 1 (after the class token) sits at (0, 1)


def test_vit_too_small_for_a_4x4_grid_is_a_setup_error():
    model = build_model(model_cfg("test_vit"), num_classes=10, image_size=32)
    with pytest.raises(ModelSetupError, match=r"test_vit.*dataset.image_size=32"):
        find_target_layer(model, 32)


def test_named_layer_with_a_1x1_map_is_refused():
    model = build_model(model_cfg("resnet18"), num_classes=10, image_size=32)
    with pytest.raises(ModelSetupError, match=r"model.target_layer='layer4'.*1x1.*dataset.image_size=32"):
        find_target_layer(model, 32, "layer4")


def test_named_layer_is_resolved_by_module_path():
    model = build_model(model_cfg("test_resnet"), num_classes=10, image_size=64)
    target = find_target_layer(model, 64, "layer3.0.conv2")
    assert target.module is model.layer3[0].conv2
    assert target.map_hw == (4, 4)


def test_unknown_named_layer_lists_valid_names():
    model = build_model(model_cfg("test_resnet"), num_classes=10, image_size=64)
    with pytest.raises(ModelSetupError, match=r"model.target_layer='layer9'.*valid names.*layer4"):
        find_target_layer(model, 64, "layer9")


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(ModelSetupError, match=r"model.name='resnet18x'.*did you mean.*resnet18"):
        build_model(model_cfg("resnet18x"), num_classes=10, image_size=32)


def test_vit_is_built_for_the_configured_size():
    model = build_model(model_cfg("test_vit"), num_classes=7, image_size=64)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 7)


def test_offline_pretrained_is_a_setup_error_without_hub_traceback(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    with pytest.raises(ModelSetupError) as info:
        build_model(model_cfg("test_resnet", pretrained=True), num_classes=10, image_size=32)
    message = str(info.value)
    assert "test_resnet" in message and "could not be fetched" in message
    assert "model.pretrained=false" in message and "model.weights=PATH" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_local_weights_load_body_and_skip_a_head_of_another_size(tmp_path, caplog):
    source = build_model(model_cfg("test_resnet"), num_classes=5, image_size=32)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    with caplog.at_level(logging.INFO, logger="proxyattention.models"):
        model = build_model(model_cfg("test_resnet", weights=str(path)), num_classes=3, image_size=32)
    body = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in body.items())
    assert model.fc.out_features == 3
    assert "fc.weight" in caplog.text and "fc.bias" in caplog.text


def test_local_weights_raw_state_dict_loads_everything(tmp_path):
    source = build_model(model_cfg("test_resnet"), num_classes=5, image_size=32)
    path = tmp_path / "raw.pt"
    torch.save(source.state_dict(), path)
    model = build_model(model_cfg("test_resnet", weights=str(path)), num_classes=5, image_size=32)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))


def test_local_weights_of_another_model_are_refused(tmp_path):
    other = build_model(model_cfg("test_efficientnet"), num_classes=5, image_size=32)
    path = tmp_path / "other.pt"
    torch.save({"model": other.state_dict()}, path)
    with pytest.raises(ModelSetupError, match=r"model.weights=.*does not fit"):
        build_model(model_cfg("test_resnet", weights=str(path)), num_classes=5, image_size=32)
    with pytest.raises(ModelSetupError, match=r"no such file"):
        build_model(model_cfg("test_resnet", weights=str(tmp_path / "missing.pt")), 5, 32)


def test_target_layer_is_a_plain_record():
    module = torch.nn.Identity()
    target = TargetLayer("x", module, (4, 4))
    assert target.layout == "NCHW" and target.num_prefix_tokens == 0
