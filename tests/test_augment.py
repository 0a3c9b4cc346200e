"""Batch-level augmentation: per-image random parameters, seeded, and the right geometry."""

from __future__ import annotations

import numpy as np
import torch

from imgpipe.config import Augment
from imgpipe.data.augment import augment_batch
from imgpipe.data.transforms import Preprocess

GREY = Preprocess(image_size=16, mode="L", mean=(0.5,), std=(0.25,))
RGB = Preprocess(image_size=16, mode="RGB", mean=(0.5,) * 3, std=(0.25,) * 3)
OFF = {"crop_padding": 0, "rotation_degrees": 0.0}


def _batch(n: int, c: int = 1) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.repeat(rng.integers(1, 255, (1, 16, 16, c), dtype=np.uint8), n, axis=0)


def test_seeded_and_different_per_image():
    batch = _batch(8)
    aug = Augment(crop_padding=3, rotation_degrees=20)
    a = augment_batch(batch, aug, GREY, torch.Generator().manual_seed(1))
    b = augment_batch(batch, aug, GREY, torch.Generator().manual_seed(1))
    c = augment_batch(batch, aug, GREY, torch.Generator().manual_seed(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({a[i].tobytes() for i in range(8)}) > 4  # copies get different augmentations
    assert a.shape == batch.shape and a.dtype == np.uint8


def test_no_augmentation_is_identity():
    batch = _batch(4, 3)
    out = augment_batch(batch, Augment(**OFF), RGB, torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(out, batch)


def test_crop_padding_is_an_integer_shift_with_zero_fill():
    batch = _batch(32)
    out = augment_batch(batch, Augment(crop_padding=2, rotation_degrees=0.0), GREY,
                        torch.Generator().manual_seed(0))
    src = np.pad(batch[0, :, :, 0], 2)
    shifts = {(dy, dx) for dy in range(5) for dx in range(5)}
    for img in out[:, :, :, 0]:  # every output is a 16x16 window of the zero-padded source
        assert any(np.array_equal(img, src[dy:dy + 16, dx:dx + 16]) for dy, dx in shifts)


def test_flip_jitter_and_erasing_act_per_image():
    batch = _batch(64, 3)
    flip = augment_batch(batch, Augment(**OFF, hflip=True), RGB, torch.Generator().manual_seed(0))
    flipped = [np.array_equal(f, batch[0][:, ::-1]) for f in flip]
    assert all(f or np.array_equal(x, batch[0]) for f, x in zip(flipped, flip, strict=True))
    assert 10 < sum(flipped) < 54
    erase = augment_batch(batch, Augment(**OFF, random_erasing=0.5), RGB,
                          torch.Generator().manual_seed(0))
    erased = [(e == 0).all(-1).sum() > 0 for e in erase]
    assert 10 < sum(erased) < 54
    jit = augment_batch(batch, Augment(**OFF, color_jitter=0.4), RGB,
                        torch.Generator().manual_seed(0))
    means = jit.reshape(64, -1).mean(1)
    assert means.std() > 1.0  # brightness differs image to image
