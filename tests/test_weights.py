"""Weights resolution: torchvision's weights API on the local hub cache (offline), files,
bundles, checkpoints; the missing-cache message; config resolution from the weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import make_test_bundle
from safetensors.torch import save_file

from imgpipe.config import ConfigError, ModelConfig, TrainConfig
from imgpipe.data.transforms import Preprocess
from imgpipe.models import (
    WeightsNotCachedError,
    create_model,
    create_model_from_weights,
    forward_features,
    resolve_weights,
    torchvision_cache_path,
)
from imgpipe.models.weights import check_weights, resolve_model_config, target_state_dict

TV_SPEC = "mobilenet_v3_small.IMAGENET1K_V1"  # the smallest registered torchvision net (6 MB)


@pytest.fixture()
def torch_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture()
def cached_mobilenet(torch_home):
    """A torchvision mobilenet_v3_small state dict written exactly where torchvision's
    ``load_state_dict_from_url`` looks for IMAGENET1K_V1 (seeded random values)."""
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v3_small(weights=None).eval()
    reference.imgpipe_model = "mobilenet_v3_small"  # what create_model tags, for forward_features
    with torch.no_grad():  # non-default BN statistics must travel too
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
    path = torch_home / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    return reference, path


def test_torchvision_name_loads_from_local_cache(cached_mobilenet):
    reference, path = cached_mobilenet
    for spec in (TV_SPEC, "MobileNet_V3_Small_Weights.IMAGENET1K_V1", "mobilenet_v3_small.DEFAULT"):
        w = resolve_weights(spec)
        assert (w.kind, w.model, w.path, w.in_channels, w.cifar_stem) == (
            "torchvision", "mobilenet_v3_small", str(path), 3, False)
        assert w.preprocess == Preprocess(image_size=224, mode="RGB", mean=(0.485, 0.456, 0.406),
                                          std=(0.229, 0.224, 0.225))
        assert len(w.source_classes) == 1000 and w.source_classes[0] == "tench"
    model = create_model_from_weights(w).eval()  # the source head: ImageNet logits
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_grey_data_and_new_head_from_rgb_weights(cached_mobilenet):
    reference, _ = cached_mobilenet
    w = resolve_weights(TV_SPEC)
    grey = create_model_from_weights(w, num_classes=5, in_channels=1).eval()
    x = torch.rand(2, 1, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # Summed colour filters on grey input == the RGB net on grey replicated to RGB.
        torch.testing.assert_close(forward_features(grey, x),
                                   forward_features(reference, x.expand(-1, 3, -1, -1)),
                                   rtol=1e-4, atol=1e-4)
        assert grey(x).shape == (2, 5)


def test_missing_cache_names_path_and_fetch_command(torch_home):
    expected = torch_home / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    with pytest.raises(WeightsNotCachedError) as err:
        resolve_weights("resnet50.IMAGENET1K_V2")
    msg = str(err.value)
    assert str(expected) in msg
    assert f"TORCH_HOME={torch_home} python -c" in msg
    assert 'get_weight("ResNet50_Weights.IMAGENET1K_V2").get_state_dict(' in msg
    assert not expected.exists()  # nothing was downloaded
    with pytest.raises(ConfigError, match=r"model\.weights: .*resnet50-11ad3fa6\.pth"):
        check_weights("resnet50.IMAGENET1K_V2")


def test_bad_specs_fail_with_reason(tmp_path, torch_home):
    with pytest.raises(ValueError, match="torchvision knows no such weights"):
        resolve_weights("resnet50.IMAGENET9K_V9")
    with pytest.raises(ValueError, match="does not register"):
        resolve_weights("alexnet.IMAGENET1K_V1")
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_weights(str(tmp_path / "missing.safetensors"))
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="cannot read weights"):
        resolve_weights(str(bad))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a bundle"):
        resolve_weights(str(tmp_path / "empty"))
    corrupt = torch_home / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="delete it and fetch it again"):
        resolve_weights(TV_SPEC)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": Path("x")}, path)  # non-tensor object
    with pytest.raises(ValueError, match="cannot read weights"):
        resolve_weights(str(path))


def test_bundle_and_checkpoint_folders(tmp_path):
    bundle = make_test_bundle(tmp_path / "bundles", num_classes=3, model="cnn", mode="L",
                              image_size=16)
    for spec in (bundle, bundle.parent):  # a version folder, or the model folder (latest)
        w = resolve_weights(str(spec))
        assert (w.kind, w.model, w.in_channels, w.cifar_stem) == ("bundle", "cnn", 1, True)
        assert w.preprocess.image_size == 16 and w.source_classes == [f"class_{i}" for i in range(3)]
    ckpt = tmp_path / "run" / "best"
    ckpt.mkdir(parents=True)
    net = create_model("resnet18", 4, in_channels=3, cifar_stem=False)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(ckpt / "model.safetensors"))
    pre = Preprocess(image_size=24, mode="RGB", mean=(0.5,) * 3, std=(0.2,) * 3)
    (ckpt / "meta.json").write_text(json.dumps({
        "train": TrainConfig(model={"name": "resnet18", "cifar_stem": False}).model_dump(mode="json"),
        "preprocess": pre.model_dump(mode="json"), "class_names": list("abcd")}))
    w = resolve_weights(str(tmp_path / "run"))  # a run folder finds best/
    assert (w.kind, w.model, w.cifar_stem, w.preprocess, w.source_classes) == (
        "checkpoint", "resnet18", False, pre, list("abcd"))
    same = create_model_from_weights(w).eval()
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(same(x), net.eval()(x))
    # Same head size but other classes: the head is not reused.
    assert "fc.weight" not in target_state_dict(w, "resnet18", list("wxyz"))
    assert "fc.weight" in target_state_dict(w, "resnet18", list("abcd"))


def _data_pre(size: int) -> Preprocess:
    return Preprocess(image_size=size, mode="L", mean=(0.3,), std=(0.2,))


def test_model_config_from_weights(cached_mobilenet):
    w = resolve_weights(TV_SPEC)
    cfg, pre = resolve_model_config(ModelConfig(weights=TV_SPEC), _data_pre, w)
    assert (cfg.name, cfg.cifar_stem, cfg.image_size) == ("mobilenet_v3_small", False, 224)
    assert pre.mode == "RGB" and pre.mean == (0.485, 0.456, 0.406)  # grey data decoded to RGB
    cfg, pre = resolve_model_config(ModelConfig(weights=TV_SPEC, image_size=64), _data_pre, w)
    assert cfg.image_size == pre.image_size == 64
    with pytest.raises(ConfigError, match="model.name: resnet18 given"):
        resolve_model_config(ModelConfig(name="resnet18", weights=TV_SPEC), _data_pre, w)
    with pytest.raises(ConfigError, match="model.finetune: partial:9 but mobilenet_v3_small has 6"):
        resolve_model_config(ModelConfig(weights=TV_SPEC, finetune="partial:9"), _data_pre, w)
    cfg, pre = resolve_model_config(ModelConfig(), _data_pre, None)  # no weights: old defaults
    assert (cfg.name, cfg.cifar_stem, cfg.image_size, pre) == ("cnn", True, 32, _data_pre(32))


def test_init_checkpoint_is_still_accepted():
    assert ModelConfig(init_checkpoint="a.pt").weights == "a.pt"
    assert TrainConfig.model_validate({"model": {"init_checkpoint": None}}).model.weights is None
    with pytest.raises(ValueError, match="init_checkpoint and weights both set"):
        ModelConfig(init_checkpoint="a.pt", weights="b.pt")


def test_cache_path_follows_torch_home(torch_home):
    from torchvision.models import get_weight

    w = get_weight("ResNet50_Weights.IMAGENET1K_V2")
    assert torchvision_cache_path(w) == torch_home / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
