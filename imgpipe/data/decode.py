"""Encoded bytes → pixels: the one image decoder behind ingest, the stream, evaluation and serving.

Every path that opens an image goes through here, so a hostile or unusual image gets the same
answer everywhere:

- **Size guard.** The header's dimensions are checked against :data:`MAX_SOURCE_PIXELS` (with
  Pillow's ``MAX_IMAGE_PIXELS`` semantics: ``max(1, w) * max(1, h) > limit`` is refused) and
  :data:`MAX_SOURCE_SIDE` before any pixel is decoded. No warning filter is touched
  (``warnings.catch_warnings`` mutates process-global state and is not thread-safe): whether a
  concurrent thread turned Pillow's ``DecompressionBombWarning`` into an error or not, an
  oversize image is refused with :class:`ImageTooLargeError` and the same message.
- **Orientation.** EXIF/TIFF/XMP orientation is applied for every mode (Pillow's
  ``ImageOps.exif_transpose``), before any conversion drops the metadata.
- **Bit depth.** High-bit-depth samples map to 8 bits by their bit depth, the same for every
  image (never per-image min–max): 16-bit integer modes (``I;16*``, and ``I``, which Pillow
  uses for 16-bit PGM/TIFF data) keep their high byte, ``v >> 8`` — what Pillow itself does
  when it reads 16-bit RGB/RGBA/LA files and what torchvision's ``to_dtype(uint16 → uint8,
  scale=True)`` does, so a 16-bit grey image and a 16-bit colour one agree (values outside
  0..65535 are clipped); 32-bit float ``F`` as ``[0, 1] → 0..255`` (torchvision's convention
  for float images; clipped, rounded).
- **Transparency.** Alpha (``LA``, ``PA``, ``RGBA``, a ``P``/``L``/``RGB`` transparency key) is
  composited on black, so output does not depend on the colour values hidden under alpha 0;
  premultiplied modes (``La``, ``RGBa``) already hold that composite.
- **Formats.** Only raster formats imgpipe documents are opened (:data:`IMAGE_FORMATS`):
  e.g. EPS, which Pillow renders by running Ghostscript, is refused.
"""

from __future__ import annotations

import io
import re
import struct
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    from imgpipe.data.transforms import Preprocess

# Pillow warns at 89M pixels and raises at 2x that; we refuse far earlier because nothing this
# product classifies needs more than a 64-megapixel source image.
MAX_SOURCE_PIXELS = 64_000_000
MAX_SOURCE_SIDE = 16_384
# Pillow format ids opened (the JPEG opener also reads multi-picture MPO files from cameras);
# only those this Pillow build registers, so a missing optional codec is not a crash.
Image.init()
IMAGE_FORMATS = tuple(f for f in ("JPEG", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM")
                      if f in Image.OPEN)
# Modes whose pixels carry no colour: a dataset of only these is prepared as mode "L".
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_PREMULTIPLIED = {"La": "L", "RGBa": "RGB"}
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")
# What a malformed file makes Pillow raise while parsing headers or decoding pixels.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image (corrupt, truncated, bomb, absurd size, bad format)."""


class ImageTooLargeError(ImageDecodeError):
    """An image whose header declares more pixels (or a longer side) than the limit allows."""


def effective_pixel_limit(max_pixels: int | None = None) -> int:
    """The pixel limit in force: ``max_pixels`` (default :data:`MAX_SOURCE_PIXELS`), lowered to
    Pillow's ``Image.MAX_IMAGE_PIXELS`` when that is smaller, so that anything Pillow's own guard
    flags is refused by ours too (the outcome never depends on Pillow's warning path)."""
    limit = MAX_SOURCE_PIXELS if max_pixels is None else int(max_pixels)
    pillow = Image.MAX_IMAGE_PIXELS
    return min(limit, int(pillow)) if pillow is not None else limit


def _too_large(pixels: int | None, limit: int) -> ImageTooLargeError:
    count = f"{pixels} pixels" if pixels is not None else "its pixel count"
    return ImageTooLargeError(f"image dimensions refused: {count} exceed the limit of {limit} "
                              "pixels (decompression-bomb guard)")


def check_dimensions(width: int, height: int, max_pixels: int | None = None) -> None:
    """Refuse ``width x height`` above the limits (Pillow's ``max(1, w) * max(1, h)`` count).

    Raises:
        ImageTooLargeError: more pixels than :func:`effective_pixel_limit`, or a side longer
            than :data:`MAX_SOURCE_SIDE`.
    """
    limit = effective_pixel_limit(max_pixels)
    pixels = max(1, width) * max(1, height)
    if pixels > limit:
        raise _too_large(pixels, limit)
    if max(width, height) > MAX_SOURCE_SIDE:
        raise ImageTooLargeError(f"image dimensions refused: {width}x{height} has a side longer "
                                 f"than {MAX_SOURCE_SIDE} pixels")
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image dimensions {width}x{height} are empty")


def _open_checked(data: bytes, max_pixels: int | None) -> Image.Image:
    """Parse the header and check its size; no pixel is decoded yet."""
    if not data:
        raise ImageDecodeError("empty image data")
    limit = effective_pixel_limit(max_pixels)
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's guard fired first (as an error, or as a warning some filter made an error).
        # Our limit is never above Pillow's, so our own check would refuse it too: same answer.
        found = _BOMB_PIXELS.search(str(e))
        raise _too_large(int(found.group(1)) if found else None, limit) from None
    except UnidentifiedImageError:
        raise ImageDecodeError("cannot decode image: unrecognised format or corrupt header "
                               f"(supported formats: {', '.join(IMAGE_FORMATS)})") from None
    except _DECODE_ERRORS as e:
        raise ImageDecodeError(f"cannot decode image: {e}") from None
    try:
        check_dimensions(*img.size, max_pixels=max_pixels)
    except ImageDecodeError:
        img.close()
        raise
    return img


def read_image_header(data: bytes, max_pixels: int | None = None) -> tuple[int, int, str]:
    """``(width, height, mode)`` from the header alone, after the size guard.

    Raises:
        ImageTooLargeError: dimensions over the limit.
        ImageDecodeError: empty, unrecognised or corrupt header.
    """
    img = _open_checked(data, max_pixels)
    with img:
        return img.width, img.height, img.mode


def open_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Bytes → a loaded, upright Pillow image of the first frame, in its native mode.

    Raises:
        ImageTooLargeError: dimensions over the limit (checked before decoding).
        ImageDecodeError: corrupt, truncated or unsupported data.
    """
    img = _open_checked(data, max_pixels)
    try:
        img.load()  # a freshly opened multi-frame image is positioned at its first frame
        _apply_orientation(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        found = _BOMB_PIXELS.search(str(e))  # a later frame/tile larger than the header said
        raise _too_large(int(found.group(1)) if found else None,
                         effective_pixel_limit(max_pixels)) from None
    except _DECODE_ERRORS as e:
        raise ImageDecodeError(f"cannot decode image: {e}") from None
    return img


def _apply_orientation(img: Image.Image) -> None:
    """EXIF/TIFF/XMP orientation, for every mode; unreadable metadata leaves pixels as stored."""
    try:
        ImageOps.exif_transpose(img, in_place=True)  # a no-op without an orientation tag
    except (SyntaxError, ValueError, struct.error, KeyError, OSError):
        return


def _sixteen_bit_to_l(img: Image.Image) -> tuple[Image.Image, np.ndarray | None]:
    """16-bit samples → ``L`` by bit depth; also the alpha of a transparency key, if any."""
    arr = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
    key = img.info.get("transparency")
    alpha = None if not isinstance(key, int) else np.where(arr == key, 0, 255).astype(np.uint8)
    return Image.fromarray((arr >> 8).astype(np.uint8)), alpha


def _float_to_l(img: Image.Image) -> Image.Image:
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    return Image.fromarray(np.floor(np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def _on_black(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _rgba_palette(img: Image.Image) -> bool:
    return img.mode == "P" and getattr(img.palette, "mode", "RGB") == "RGBA"


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert a loaded, upright Pillow image of any mode to ``mode`` ("L" or "RGB").

    See the module docstring for the bit-depth and transparency rules; colour modes (CMYK,
    YCbCr, LAB, HSV, RGBX) use Pillow's conversions to RGB, and RGB → L is Pillow's ITU-R
    601-2 luma.
    """
    alpha = None
    if img.mode in _SIXTEEN_BIT_MODES:
        img, alpha = _sixteen_bit_to_l(img)
    elif img.mode == "F":
        img = _float_to_l(img)
    elif img.mode in _PREMULTIPLIED:
        # premultiplied colour = colour * alpha = the colour composited on black
        img = Image.merge(_PREMULTIPLIED[img.mode], img.split()[:-1])
    if alpha is not None:
        img = _on_black(Image.merge("RGBA", (img, img, img, Image.fromarray(alpha))))
    elif img.mode in ("LA", "PA", "RGBA") or "transparency" in img.info or _rgba_palette(img):
        img = _on_black(img.convert("RGBA"))
    elif img.mode not in ("L", "RGB"):
        img = img.convert("L" if img.mode == "1" else "RGB")
    return img.convert(mode) if img.mode != mode else img


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def decode_image(data: bytes, pre: Preprocess, max_pixels: int | None = None) -> np.ndarray:
    """Encoded bytes → uint8 array ``(size, size, channels)`` in ``pre.mode``.

    ``max_pixels`` lowers the source-pixel limit (serving passes its own); default
    :data:`MAX_SOURCE_PIXELS`.

    Raises:
        ImageTooLargeError: a decompression bomb or absurd dimensions (before decoding pixels).
        ImageDecodeError: corrupt, truncated or unsupported data.
    """
    img = open_image(data, max_pixels)
    try:
        img = _resize_center_crop(to_mode(img, pre.mode), pre.image_size)
    except _DECODE_ERRORS as e:
        raise ImageDecodeError(f"cannot decode image: {e}") from None
    arr = np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only
    return arr[:, :, None] if arr.ndim == 2 else arr
