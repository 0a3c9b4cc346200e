"""The one preprocessing resolver: decode → mode → resize → (augment) → normalise.

Training, evaluation and serving all call these functions, so a served image is turned into
exactly the tensor that training saw (timm's ``resolve_data_config`` / torchvision's presets).
"""

from __future__ import annotations

import io
import warnings
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torchvision.transforms import v2

# Pillow's own bomb guard warns at 89M pixels and raises at 2x; we refuse far earlier because
# nothing this product classifies needs more than a 64-megapixel source image.
MAX_SOURCE_PIXELS = 64_000_000
MAX_SOURCE_SIDE = 16_384


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image (corrupt, truncated, bomb, absurd size)."""


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


class Augment(BaseModel):
    """Train-time augmentation; off for evaluation and serving."""

    model_config = ConfigDict(extra="forbid")

    crop_padding: int = Field(2, ge=0, description="random crop after zero padding (pixels)")
    hflip: bool = Field(False, description="random horizontal flip (wrong for digits/text)")
    rotation_degrees: float = Field(10.0, ge=0, le=180)
    color_jitter: float = Field(0.0, ge=0, le=1, description="brightness/contrast strength")
    random_erasing: float = Field(0.0, ge=0, le=1, description="probability")


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert any Pillow image to ``mode`` the same way everywhere.

    Multi-frame images use their first frame; transparency is composited on black (the
    colour transparent pixels have in most encoders) so RGBA/LA/P-with-alpha do not depend on
    whatever colour values hide under alpha=0; 16/32-bit greyscale is rescaled, not clipped.
    """
    if getattr(img, "is_animated", False):
        img.seek(0)
    img = ImageOps.exif_transpose(img) if img.mode in ("RGB", "L", "RGBA") else img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(((arr - lo) * scale).round().astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode == "CMYK":
        img = img.convert("RGB")
    return img.convert(mode) if img.mode != mode else img


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def decode_image(data: bytes, pre: Preprocess) -> np.ndarray:
    """Encoded bytes → uint8 array ``(size, size, channels)``.

    Raises:
        ImageDecodeError: corrupt or truncated data, a decompression bomb, or absurd dimensions.
    """
    if not data:
        raise ImageDecodeError("empty image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w < 1 or h < 1 or max(w, h) > MAX_SOURCE_SIDE or w * h > MAX_SOURCE_PIXELS:
                raise ImageDecodeError(
                    f"image dimensions {w}x{h} refused (max side {MAX_SOURCE_SIDE}, "
                    f"max pixels {MAX_SOURCE_PIXELS})"
                )
            img.load()
            img = _resize_center_crop(to_mode(img, pre.mode), pre.image_size)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"image dimensions refused (decompression bomb): {e}") from e
    except UnidentifiedImageError as e:
        raise ImageDecodeError("not a recognised image format") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"cannot decode image: {e}") from e
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def normalize(pixels: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` (or ``(N, C, H, W)`` when already channels-first) → float NCHW."""
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
    arr = np.stack([decode_image(b, pre) for b in images])
    return normalize(torch.from_numpy(arr), pre)


def create_train_augment(aug: Augment, pre: Preprocess) -> v2.Transform:
    """Random augmentation on a uint8 NCHW batch (each image drawn independently)."""
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
