"""Embedded datasets (no downloads): digits-LT from scikit-learn and synthetic shapes-LT.

Both follow the CIFAR-LT recipe: a balanced val/test split per class, and a long-tailed train
split with ``n_i = int(n_max * rho^(-i / (C - 1)))`` images for class ``i`` (class 0 is the head).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from imgpipe.constants import ID, IMAGE, LABEL, LABEL_NAME, TEST, TRAIN, VAL
from imgpipe.data.splits import holdout_per_class, long_tail_counts

Record = dict[str, Any]


@dataclass
class LabeledImages:
    """Encoded images per split plus what the shard manifest needs to describe them."""

    source: str
    class_names: list[str]
    splits: dict[str, list[Record]]
    mode: str  # "L" or "RGB": the mode every image is converted to when decoded
    seed: int
    imbalance_ratio: float | None
    skipped: list[dict[str, str]] = field(default_factory=list)
    skipped_count: int = 0
    warnings: list[str] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)  # files left out on purpose, by reason


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 ``(H, W)`` or ``(H, W, 3)`` → PNG bytes (lossless, so stats are exact)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def make_record(image: bytes, label: int, class_names: list[str], record_id: str) -> Record:
    return {IMAGE: image, LABEL: int(label), LABEL_NAME: class_names[label], ID: record_id}


# ---------------------------------------------------------------------------------------------
# digits-lt
# ---------------------------------------------------------------------------------------------


def load_digits_lt(imbalance_ratio: float | None = 100.0, seed: int = 0, val_per_class: int = 20,
                   test_per_class: int = 50) -> LabeledImages:
    """scikit-learn's 8x8 digits (1797 real images) as a long-tailed, mode-"L" dataset.

    Balanced test and val images are held out per class first; the long tail is then drawn from
    what remains with ``n_max`` = the smallest remaining pool, so every class can supply its
    quota. ``imbalance_ratio=None`` keeps every remaining image. Ids are ``digits-<index>`` with
    the index into ``load_digits()``, so they are stable across seeds.

    Raises:
        ValueError: val/test quotas that leave a class without training images, or a bad ratio.
    """
    from sklearn.datasets import load_digits  # bundled with sklearn: no download

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    # Pixel values are 0..16; scale to the full uint8 range so they look like ordinary images.
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    class_names = [str(int(c)) for c in np.unique(labels)]
    held, pools = holdout_per_class(labels, len(class_names), val_per_class, test_per_class, seed)
    if imbalance_ratio is None:
        train_idx = [i for pool in pools for i in pool]
    else:
        quotas = long_tail_counts(min(len(p) for p in pools), len(class_names), imbalance_ratio)
        train_idx = [i for pool, q in zip(pools, quotas, strict=True) for i in pool[:q]]
    splits = {
        name: [make_record(encode_png(pixels[i]), int(labels[i]), class_names, f"digits-{i:06d}")
               for i in sorted(idx)]
        for name, idx in ((TRAIN, train_idx), (VAL, held[VAL]), (TEST, held[TEST]))
    }
    return LabeledImages("digits-lt", class_names, splits, "L", seed, imbalance_ratio)


# ---------------------------------------------------------------------------------------------
# shapes-lt
# ---------------------------------------------------------------------------------------------

SHAPE_KINDS = ("circle", "square", "triangle", "diamond", "pentagon", "hexagon", "star", "cross",
               "ring", "crescent")
COLOUR_FAMILIES: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (235, 225, 40),
    "green": (40, 180, 60), "cyan": (40, 205, 225), "blue": (45, 75, 230),
    "purple": (135, 55, 205), "magenta": (225, 50, 185), "white": (240, 240, 240),
    "brown": (135, 85, 40),
}
# Only used past 100 classes; "solid" first so small class counts are plain filled shapes.
STYLES = ("solid", "outline", "hstripes", "vstripes", "checker", "pair", "framed", "dotted",
          "outline-pair", "diagonal")
MAX_SHAPE_CLASSES = len(SHAPE_KINDS) * len(COLOUR_FAMILIES) * len(STYLES)
_SPLIT_CODES = {TRAIN: 0, VAL: 1, TEST: 2}
_SUPERSAMPLE = 4  # draw masks at 4x and downsample: anti-aliased edges at any image size


def shape_class(index: int) -> tuple[str, str, str]:
    """Class index → (shape kind, colour family, style).

    Consecutive classes differ in shape AND colour (colour = (q + shape) mod K), so even two or
    three classes are easy to tell apart; every (shape, colour, style) triple is used once.
    """
    if not 0 <= index < MAX_SHAPE_CLASSES:
        raise ValueError(f"shapes-lt class index must be in [0, {MAX_SHAPE_CLASSES}), got {index}")
    n_shapes, n_colours = len(SHAPE_KINDS), len(COLOUR_FAMILIES)
    shape = index % n_shapes
    q = (index // n_shapes) % n_colours
    colour = (q + shape) % n_colours
    style = index // (n_shapes * n_colours)
    return SHAPE_KINDS[shape], list(COLOUR_FAMILIES)[colour], STYLES[style]


def shape_class_names(num_classes: int) -> list[str]:
    """``colour-shape`` names (``-style`` appended beyond the first 100 classes)."""
    names = []
    for i in range(num_classes):
        shape, colour, style = shape_class(i)
        names.append(f"{colour}-{shape}" if style == "solid" else f"{colour}-{shape}-{style}")
    return names


def _regular(n: int, r: float, inner: float = 1.0) -> list[tuple[float, float]]:
    """Local vertices of a regular n-gon (or an n-pointed star when ``inner`` < 1)."""
    steps = n * 2 if inner < 1.0 else n
    radii = [r if inner >= 1.0 or k % 2 == 0 else r * inner for k in range(steps)]
    angles = [2 * math.pi * k / steps - math.pi / 2 for k in range(steps)]
    return [(rad * math.cos(a), rad * math.sin(a)) for rad, a in zip(radii, angles, strict=True)]


def _local_outline(kind: str, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of ``kind`` centred on (0, 0) with radius ``r``."""
    if kind == "cross":
        w = r * 0.36  # arm half-width
        return [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w),
                (-r, w), (-r, -w), (-w, -w)]
    if kind == "star":
        return _regular(5, r, inner=0.45)
    if kind == "square":
        s = r * 0.8
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if kind == "diamond":  # a rhombus, so it stays distinct from a rotated square
        return [(0.0, -r), (0.6 * r, 0.0), (0.0, r), (-0.6 * r, 0.0)]
    return _regular({"triangle": 3, "pentagon": 5, "hexagon": 6}[kind], r)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float,
                angle: float) -> None:
    """Fill one shape (255) on a mask; ring and crescent cut their hole with 0."""
    if kind in ("circle", "ring", "crescent"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if kind == "ring":
            draw.ellipse((cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55), fill=0)
        elif kind == "crescent":
            ox, oy = r * 0.45 * math.cos(angle), r * 0.45 * math.sin(angle)
            draw.ellipse((cx - r + ox, cy - r + oy, cx + r + ox, cy + r + oy), fill=0)
        return
    ca, sa = math.cos(angle), math.sin(angle)
    draw.polygon([(cx + x * ca - y * sa, cy + x * sa + y * ca)
                  for x, y in _local_outline(kind, r)], fill=255)


def _shape_mask(kind: str, style: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Float mask in [0, 1] of shape ``(size, size)`` with random position, scale and rotation."""
    big = size * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    r = big * rng.uniform(0.22, 0.38)
    angle = rng.uniform(0, 2 * math.pi)
    centres = [(rng.uniform(r, big - r), rng.uniform(r, big - r))]
    if style in ("pair", "outline-pair"):
        r *= 0.6
        centres = [(big * 0.28 + rng.uniform(-1, 1) * big * 0.04, big * rng.uniform(0.3, 0.7)),
                   (big * 0.72 + rng.uniform(-1, 1) * big * 0.04, big * rng.uniform(0.3, 0.7))]
    for cx, cy in centres:
        _draw_shape(draw, kind, cx, cy, r, angle)
    if "outline" in style:
        width = _SUPERSAMPLE * max(1, size // 16) * 2 + 1  # odd: MinFilter needs a centre
        mask = Image.fromarray(
            np.asarray(mask) - np.asarray(mask.filter(ImageFilter.MinFilter(width))))
    arr = np.asarray(mask.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float64) / 255
    return arr * _style_pattern(style, size)


def _style_pattern(style: str, size: int) -> np.ndarray:
    """Multiplicative fill pattern; ``framed`` adds a frame instead (handled by the caller)."""
    yy, xx = np.mgrid[0:size, 0:size]
    period = max(2, size // 8)
    if style == "hstripes":
        return ((yy // period) % 2 == 0).astype(np.float64)
    if style == "vstripes":
        return ((xx // period) % 2 == 0).astype(np.float64)
    if style == "checker":
        return (((yy // period) + (xx // period)) % 2 == 0).astype(np.float64)
    if style == "diagonal":
        return (((yy + xx) // period) % 2 == 0).astype(np.float64)
    if style == "dotted":
        return (((yy % period) < period / 2) & ((xx % period) < period / 2)).astype(np.float64)
    return np.ones((size, size))


def render_shape(class_index: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB uint8 image ``(size, size, 3)`` of class ``class_index`` on a noisy background."""
    kind, colour, style = shape_class(class_index)
    mask = _shape_mask(kind, style, size, rng)[..., None]
    base = np.asarray(COLOUR_FAMILIES[colour], dtype=np.float64)
    fg = np.clip(base + rng.normal(0, 12, size=3), 0, 255)
    # Dark, noisy, slightly tinted background: the colour family must stay the foreground's.
    bg_level = rng.uniform(10, 70) + rng.normal(0, 6, size=3)
    bg = bg_level + rng.normal(0, rng.uniform(3, 14), size=(size, size, 3))
    if style == "framed":
        edge = max(1, size // 16)
        frame = np.zeros((size, size, 1))
        frame[:edge], frame[-edge:], frame[:, :edge], frame[:, -edge:] = 1, 1, 1, 1
        mask = np.maximum(mask, frame)
    img = bg * (1 - mask) + fg * mask
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def load_shapes_lt(num_classes: int = 10, images_per_class: int = 500,
                   imbalance_ratio: float | None = 100.0, image_size: int = 32, seed: int = 0,
                   val_per_class: int = 20, test_per_class: int = 50) -> LabeledImages:
    """Synthetic long-tailed RGB shapes: class = (shape kind, colour family[, style]).

    Train has ``long_tail_counts(images_per_class, num_classes, rho)`` images per class
    (``rho=None`` → balanced); val and test are balanced. Each image is drawn from an RNG seeded
    by (seed, split, class, index), so an image does not change when other classes or counts do.

    Raises:
        ValueError: ``num_classes`` outside [2, MAX_SHAPE_CLASSES] or another bad size.
    """
    if not 2 <= num_classes <= MAX_SHAPE_CLASSES:
        raise ValueError(f"num_classes must be in [2, {MAX_SHAPE_CLASSES}], got {num_classes}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    class_names = shape_class_names(num_classes)
    train_counts = (long_tail_counts(images_per_class, num_classes, imbalance_ratio)
                    if imbalance_ratio is not None else [images_per_class] * num_classes)
    per_split = {TRAIN: train_counts, VAL: [val_per_class] * num_classes,
                 TEST: [test_per_class] * num_classes}
    splits: dict[str, list[Record]] = {}
    for split, counts in per_split.items():
        records = []
        for c, n in enumerate(counts):
            for k in range(n):
                rng = np.random.default_rng([seed, _SPLIT_CODES[split], c, k])
                png = encode_png(render_shape(c, image_size, rng))
                records.append(make_record(png, c, class_names, f"shapes-{split}-{c:04d}-{k:05d}"))
        splits[split] = records
    return LabeledImages("shapes-lt", class_names, splits, "RGB", seed, imbalance_ratio)
