"""The one preprocessing resolver: decode → mode → resize → (augment) → normalise.

Training, evaluation and serving all call these functions, so a served image is turned into
exactly the tensor that training saw (timm's ``resolve_data_config`` / torchvision's presets).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

# Decoding lives in its own module; these names stay importable from here (one preprocessing).
from imgpipe.config import Augment
from imgpipe.data.decode import (
    MAX_SOURCE_PIXELS,
    MAX_SOURCE_SIDE,
    ImageDecodeError,
    ImageTooLargeError,
    decode_image,
    to_mode,
)

if TYPE_CHECKING:
    # Imported where used: Ray Data's coordinators unpickle ``Preprocess`` with every stream
    # plan, and a fresh process pays ~3 s for torch and ~3 s more for torchvision.
    import torch
    from torchvision.transforms import v2

__all__ = [
    "MAX_SOURCE_PIXELS", "MAX_SOURCE_SIDE", "ImageDecodeError", "ImageTooLargeError",
    "Preprocess", "augment_batch", "create_train_augment", "decode_image", "normalize",
    "preprocess_images", "to_mode",
]


class Preprocess(BaseModel):
    """How raw images become model inputs; stored in the shard manifest and in every bundle."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(32, ge=4, le=1024, description="square side after resize+crop")
    mode: Literal["L", "RGB"] = "L"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    @model_validator(mode="after")
    def _channels_match(self) -> Preprocess:
        n = self.channels
        if len(self.mean) != n or len(self.std) != n:
            raise ValueError(
                f"mean/std need {n} value(s) for mode {self.mode!r}, got "
                f"mean={self.mean} std={self.std}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        return self

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3


def normalize(pixels: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` (or ``(N, C, H, W)`` when already channels-first) → float NCHW."""
    import torch

    x = pixels
    if x.ndim == 4 and x.shape[-1] == pre.channels and x.shape[1] != pre.channels:
        # contiguous NCHW: DDP's gradient buckets expect the standard layout
        x = x.permute(0, 3, 1, 2).contiguous()
    x = x.float().div_(255.0)
    mean = torch.tensor(pre.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def preprocess_images(images: list[bytes], pre: Preprocess) -> torch.Tensor:
    """Evaluation/serving preprocessing of encoded images → float ``(N, C, S, S)``.

    Raises ImageDecodeError for the first unusable image (callers that must skip bad images
    call ``decode_image`` per item).
    """
    import torch

    arr = np.stack([decode_image(b, pre) for b in images])
    return normalize(torch.from_numpy(arr), pre)


def create_train_augment(aug: Augment, pre: Preprocess) -> v2.Transform:
    """Random augmentation on a uint8 NCHW batch (each image drawn independently)."""
    from torchvision.transforms import v2

    ops: list[v2.Transform] = []
    if aug.rotation_degrees > 0:
        ops.append(v2.RandomRotation(aug.rotation_degrees))
    if aug.crop_padding > 0:
        ops.append(v2.RandomCrop(pre.image_size, padding=aug.crop_padding))
    if aug.hflip:
        ops.append(v2.RandomHorizontalFlip())
    if aug.color_jitter > 0:
        ops.append(v2.ColorJitter(brightness=aug.color_jitter, contrast=aug.color_jitter))
    # v2.Compose refuses an empty list: augmentation switched off entirely is the identity.
    return v2.Compose(ops) if ops else v2.Identity()


def augment_batch(pixels: np.ndarray, aug: Augment, pre: Preprocess,
                  generator: torch.Generator) -> np.ndarray:
    """Augment each image of a uint8 ``(N, H, W, C)`` batch independently; returns uint8 NHWC.

    torchvision v2 draws one set of random parameters per call, so images are transformed one
    by one: every minority copy gets its own crop/rotation. Randomness comes from the global
    torch RNG, which is forked and seeded from ``generator`` so results depend only on the seed.
    """
    if len(pixels) == 0:
        return pixels
    import torch
    from torchvision.transforms import v2

    transform = create_train_augment(aug, pre)
    erase = v2.RandomErasing(p=aug.random_erasing) if aug.random_erasing > 0 else None
    chw = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    out = torch.empty_like(chw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(len(chw)):
            img = transform(chw[i])
            if erase is not None:
                img = erase(img)
            out[i] = img
    return out.permute(0, 2, 3, 1).contiguous().numpy()
