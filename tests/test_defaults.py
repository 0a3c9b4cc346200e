"""Input size and stem derived from the data unless the user fixed them."""

from __future__ import annotations

from imgpipe.config import TrainConfig
from imgpipe.data.manifest import ImageInfo, load_manifest
from imgpipe.training.defaults import MIN_SIDE, resolve_input_size


def _manifest(root: str, w: int | None, h: int | None):
    m = load_manifest(root)
    return m.model_copy(update={"image": ImageInfo(height=h, width=w, mode=m.image.mode)})


def test_size_and_stem_follow_native_images(tiny_digits):
    cfg = TrainConfig(data=tiny_digits)
    photo, line = resolve_input_size(cfg, _manifest(tiny_digits, 160, 120))
    assert photo.model.image_size == 120 and photo.model.cifar_stem is False
    assert "160x120" in line and "ImageNet stem" in line
    tiny, _ = resolve_input_size(cfg, _manifest(tiny_digits, 8, 8))  # upsampled to the floor
    assert tiny.model.image_size == MIN_SIDE == 16 and tiny.model.cifar_stem is True
    # rounded up to a multiple of 8, never down below the native side
    mnist, _ = resolve_input_size(cfg, _manifest(tiny_digits, 28, 28))
    assert mnist.model.image_size == 32
    odd, _ = resolve_input_size(cfg, _manifest(tiny_digits, 150, 100))
    assert odd.model.image_size == 104
    huge, _ = resolve_input_size(cfg, _manifest(tiny_digits, 4000, 3000))
    assert huge.model.image_size == 224
    mixed, line = resolve_input_size(cfg, _manifest(tiny_digits, None, None))
    assert mixed.model.image_size == 32 and "mixed" in line


def test_floor_is_the_architectures_own_minimum_when_larger(tiny_digits):
    cfg = TrainConfig(data=tiny_digits, model={"name": "convnext_tiny"})
    got, _ = resolve_input_size(cfg, _manifest(tiny_digits, 8, 8))
    assert got.model.image_size == 32  # convnext_tiny's 4x stem and three 2x downsamples


def test_user_choice_wins(tiny_digits):
    cfg = TrainConfig(data=tiny_digits, model={"image_size": 48, "cifar_stem": True})
    got, line = resolve_input_size(cfg, _manifest(tiny_digits, 160, 120))
    assert got.model.image_size == 48 and got.model.cifar_stem is True and "as configured" in line
    init = TrainConfig(data=tiny_digits, model={"init_checkpoint": "w.pt"})
    got, _ = resolve_input_size(init, _manifest(tiny_digits, 160, 120))
    # the starting weights fix the input: left unset here, resolve_model_config fills it
    # from the weights (a bare file: 32)
    assert got.model.image_size is None and got.model.cifar_stem is None


def test_a_vit_gets_a_multiple_of_its_patch_size(tiny_digits):
    from imgpipe.models.weights import resolve_model_config

    cfg = TrainConfig(data=tiny_digits, model={"name": "vit_b_16"})
    for (w, h), size in (((150, 100), 112), ((300, 20), 32), ((8, 8), 16), ((4000, 3000), 224)):
        got, line = resolve_input_size(cfg, _manifest(tiny_digits, w, h))
        assert got.model.image_size == size, (w, h)
        assert "stem" not in line  # a ViT has no CIFAR/ImageNet stem choice
        resolve_model_config(got.model, _manifest(tiny_digits, w, h).preprocess, None)


def test_thin_images_warn_that_the_centre_crop_drops_most_of_them(tiny_digits):
    cfg = TrainConfig(data=tiny_digits)
    _, thin = resolve_input_size(cfg, _manifest(tiny_digits, 300, 20))
    assert "warning" in thin and "middle 7%" in thin
    _, photo = resolve_input_size(cfg, _manifest(tiny_digits, 160, 120))
    assert "warning" not in photo
