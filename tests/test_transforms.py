"""The shared preprocessing: decode, mode conversion, refusal of bad images, augmentation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from imgpipe.config import Augment
from imgpipe.data.transforms import (
    ImageDecodeError,
    Preprocess,
    augment_batch,
    decode_image,
    normalize,
    preprocess_images,
)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


GREY = Preprocess(image_size=16, mode="L", mean=(0.5,), std=(0.25,))
RGB = Preprocess(image_size=16, mode="RGB", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_decode_resizes_and_keeps_channels():
    img = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, mode="L")
    out = decode_image(encode(img), GREY)
    assert out.shape == (16, 16, 1) and out.dtype == np.uint8
    assert decode_image(encode(img.convert("RGB")), RGB).shape == (16, 16, 3)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "RGB", "CMYK", "I;16"])
def test_every_mode_decodes(mode):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8), mode="RGB")
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (20, 30), dtype=np.uint16))
    else:
        img = base.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    for pre in (GREY, RGB):
        out = decode_image(encode(img, fmt), pre)
        assert out.shape == (16, 16, pre.channels)


def test_transparent_pixels_do_not_leak_hidden_colour():
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., :3] = 200  # hidden colour under alpha = 0
    b = a.copy()
    b[..., :3] = 10
    x = decode_image(encode(Image.fromarray(a, "RGBA")), RGB)
    y = decode_image(encode(Image.fromarray(b, "RGBA")), RGB)
    np.testing.assert_array_equal(x, y)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("L", (8, 8), c) for c in (10, 250)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = decode_image(buf.getvalue(), GREY)
    assert abs(int(out.mean()) - 10) <= 2


@pytest.mark.parametrize("data", [b"", b"not an image", None])
def test_garbage_and_truncated_are_refused(data):
    if data is None:
        full = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
        data = full[: len(full) // 2]
    with pytest.raises(ImageDecodeError):
        decode_image(data, RGB)


def test_absurd_dimensions_refused_before_decoding():
    # A 1-bit PNG of 20000x20000 is tiny on disk but 400 Mpixel in memory.
    img = Image.new("1", (20_000, 20_000))
    with pytest.raises(ImageDecodeError, match="dimensions"):
        decode_image(encode(img), GREY)


def test_normalize_and_preprocess_agree():
    img = Image.fromarray(np.full((16, 16), 128, np.uint8), mode="L")
    x = preprocess_images([encode(img)], GREY)
    assert x.shape == (1, 1, 16, 16)
    np.testing.assert_allclose(x.numpy(), (128 / 255 - 0.5) / 0.25, atol=1e-6)
    nhwc = torch.from_numpy(decode_image(encode(img), GREY))[None]
    torch.testing.assert_close(normalize(nhwc, GREY), x)


def test_augment_is_seeded_and_per_image():
    rng = np.random.default_rng(0)
    batch = np.repeat(rng.integers(0, 255, (1, 16, 16, 1), dtype=np.uint8), 8, axis=0)
    aug = Augment(crop_padding=3, rotation_degrees=20)
    a = augment_batch(batch, aug, GREY, torch.Generator().manual_seed(1))
    b = augment_batch(batch, aug, GREY, torch.Generator().manual_seed(1))
    c = augment_batch(batch, aug, GREY, torch.Generator().manual_seed(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # copies of the same image get different augmentations
    assert len({a[i].tobytes() for i in range(8)}) > 4
    assert a.shape == batch.shape and a.dtype == np.uint8
