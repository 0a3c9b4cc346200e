"""Model registry, shapes, stems, local init and unwrapping."""

from __future__ import annotations

import logging
import typing

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from imgpipe.config import ModelConfig
from imgpipe.models import (
    HEAD,
    create_model,
    feature_dim,
    forward_features,
    get_classifier,
    get_model_spec,
    list_models,
    load_init_weights,
    parameter_stages,
    reset_classifier,
    unwrap_model,
)


def _images(channels: int = 3, size: int = 32, n: int = 2) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(0))


def _save_safetensors(model: nn.Module, path) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


FEATURE_DIMS = {"cnn": 128, "resnet18": 512, "resnet34": 512, "resnet50": 2048,
                "mobilenet_v3_small": 1024, "efficientnet_b0": 1280, "convnext_tiny": 768,
                "vit_b_16": 768}


@pytest.mark.parametrize("name", list_models())
def test_every_model_gives_logits_features_and_stages(name):
    # Grey input into every architecture, a tiny forward only (ViT at 32 px: 4 patches).
    model = create_model(name, num_classes=10, in_channels=1, image_size=32).eval()
    x = _images(1)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert get_classifier(model).out_features == 10
    feats = forward_features(model, x)
    assert feats.shape == (2, FEATURE_DIMS[name]) == (2, feature_dim(model))
    stages = parameter_stages(model)  # raises if a parameter belongs to no stage
    head = {n for n, s in stages.items() if s == HEAD}
    assert head == {f"{get_model_spec(name).head}.weight", f"{get_model_spec(name).head}.bias"}
    assert set(stages.values()) == {HEAD, *range(len(get_model_spec(name).stages))}


def test_rgb_models_and_reset_classifier():
    model = create_model("resnet18", num_classes=10, in_channels=3).eval()
    x = _images(3)
    with torch.no_grad():
        feats = forward_features(model, x)
        reset_classifier(model, 0)  # timm's convention: the model now returns features
        torch.testing.assert_close(model(x), feats)
        reset_classifier(model, 4)
        assert model(x).shape == (2, 4)


def test_registry_matches_config_choices():
    literal, _none = typing.get_args(ModelConfig.model_fields["name"].annotation)
    assert set(list_models()) == set(typing.get_args(literal)) == set(FEATURE_DIMS)


def _final_feature_size(model: nn.Module, block: nn.Module) -> tuple[int, int]:
    seen = {}

    def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen["shape"] = output.shape  # returns None: the hook must not replace the output

    handle = block.register_forward_hook(record)
    with torch.no_grad():
        model.eval()(_images())
    handle.remove()
    return tuple(seen["shape"][-2:])


def test_cifar_stem_keeps_resolution():
    cifar = create_model("resnet18", 10, cifar_stem=True)
    imagenet = create_model("resnet18", 10, cifar_stem=False)
    assert cifar.conv1.kernel_size == (3, 3) and isinstance(cifar.maxpool, nn.Identity)
    assert _final_feature_size(cifar, cifar.layer4) == (4, 4)
    assert _final_feature_size(imagenet, imagenet.layer4) == (1, 1)
    cnn, cnn_strided = create_model("cnn", 10), create_model("cnn", 10, cifar_stem=False)
    assert _final_feature_size(cnn, cnn.features) == (4, 4)
    assert _final_feature_size(cnn_strided, cnn_strided.features) == (2, 2)


def test_cnn_is_small_and_takes_other_sizes():
    model = create_model("cnn", 10, in_channels=1).eval()
    assert sum(p.numel() for p in model.parameters()) < 500_000
    with torch.no_grad():
        assert model(_images(1, size=8)).shape == (2, 10)
        assert model(_images(1, size=48)).shape == (2, 10)


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_init_from_safetensors_reproduces_outputs(tmp_path, name):
    torch.manual_seed(1)
    source = create_model(name, 10).eval()
    with torch.no_grad():  # non-default BN statistics, so they must travel too
        for m in source.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
    path = tmp_path / "init.safetensors"
    _save_safetensors(source, path)
    torch.manual_seed(2)
    copy = create_model(name, 10)
    load_init_weights(copy, path)
    copy.eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(copy(x), source(x))


def test_head_mismatch_skips_head(tmp_path, caplog):
    source = create_model("cnn", 5)
    path = tmp_path / "five.safetensors"
    _save_safetensors(source, path)
    target = create_model("cnn", 10)
    fc_before = target.fc.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="imgpipe.models"):
        report = load_init_weights(target, path)
    assert report["skipped_shape"] == ["fc.bias", "fc.weight"]
    assert "fc.weight" in caplog.text
    torch.testing.assert_close(target.features[0].weight, source.features[0].weight)
    torch.testing.assert_close(target.fc.weight, fc_before)


def test_init_from_wrapped_pt_checkpoint(tmp_path):
    source = create_model("cnn", 4)
    state = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"model": state, "epoch": 7}, path)
    target = create_model("cnn", 4, in_channels=3)
    load_init_weights(target, path)
    torch.testing.assert_close(target.fc.weight, source.fc.weight)


def test_missing_checkpoint_names_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_init_weights(create_model("cnn", 10), missing)


def test_unrelated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(3)}, str(path))
    with pytest.raises(ValueError, match="no tensor matches"):
        load_init_weights(create_model("cnn", 10), path)


class _DDPLike(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_unwrap_model():
    model = create_model("cnn", 3)
    assert unwrap_model(model) is model
    assert unwrap_model(_DDPLike(model)) is model
    compiled = torch.compile(model)  # lazy: nothing compiles until it is called
    assert unwrap_model(compiled) is model
    assert unwrap_model(_DDPLike(torch.compile(model))) is model


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="nope.*cnn, convnext_tiny, .*resnet50, vit_b_16"):
        create_model("nope", 10)
