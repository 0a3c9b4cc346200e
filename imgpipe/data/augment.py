"""Batch-level train augmentation: one vectorised pass per batch, random parameters per image.

torchvision v2 transforms draw one set of random parameters per call, so augmenting every
image differently means a Python loop over images — the stream's main cost on small images.
Here rotation and random-crop translation become one affine warp per image done for the whole
batch by ``torch.nn.functional.affine_grid`` / ``grid_sample`` (nearest, zero fill, as
``v2.RandomRotation`` and ``v2.RandomCrop(padding=…)``), and flip, brightness/contrast and
random erasing are per-image masks and factors. The distributions follow torchvision's
(``RandomErasing``: scale (0.02, 0.33), log-uniform ratio (0.3, 3.3), value 0).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from imgpipe.config import Augment
from imgpipe.data.transforms import Preprocess

_GREY = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _warp(x: torch.Tensor, aug: Augment, gen: torch.Generator) -> torch.Tensor:
    """Per-image rotation (±degrees) and integer translation (±crop_padding px)."""
    n, _, h, w = x.shape
    angle = _uniform(n, -aug.rotation_degrees, aug.rotation_degrees, gen) * (math.pi / 180)
    p = aug.crop_padding
    tx = torch.randint(-p, p + 1, (n,), generator=gen).float() if p else torch.zeros(n)
    ty = torch.randint(-p, p + 1, (n,), generator=gen).float() if p else torch.zeros(n)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # affine_grid maps output coordinates (in [-1, 1]) to input coordinates.
    theta = torch.stack([torch.stack([cos, -sin * h / w, 2 * tx / w], 1),
                         torch.stack([sin * w / h, cos, 2 * ty / h], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _jitter(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Brightness then contrast, factors uniform in [max(0, 1-s), 1+s] per image."""
    n, c = x.shape[:2]
    lo = max(0.0, 1 - strength)
    x = x * _uniform(n, lo, 1 + strength, gen).view(n, 1, 1, 1)
    x = x.clamp_(0, 255)
    grey = (x * _GREY.view(1, 3, 1, 1)).sum(1, keepdim=True) if c == 3 else x
    mean = grey.mean(dim=(1, 2, 3), keepdim=True)
    f = _uniform(n, lo, 1 + strength, gen).view(n, 1, 1, 1)
    return (x * f + mean * (1 - f)).clamp_(0, 255)


def _erase(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """RandomErasing with probability ``p``: one zero rectangle per chosen image."""
    n, _, h, w = x.shape
    area = _uniform(n, 0.02, 0.33, gen) * h * w
    ratio = torch.exp(_uniform(n, math.log(0.3), math.log(3.3), gen))
    eh = torch.sqrt(area * ratio).round().clamp(1, h)
    ew = torch.sqrt(area / ratio).round().clamp(1, w)
    top = (torch.rand(n, generator=gen) * (h - eh + 1)).floor()
    left = (torch.rand(n, generator=gen) * (w - ew + 1)).floor()
    on = torch.rand(n, generator=gen) < p
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    box = ((rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1))
           & (cols >= left.view(n, 1, 1)) & (cols < (left + ew).view(n, 1, 1)))
    mask = (box & on.view(n, 1, 1)).unsqueeze(1)
    return x.masked_fill(mask, 0.0)


def augment_batch(pixels: np.ndarray, aug: Augment, pre: Preprocess,
                  generator: torch.Generator) -> np.ndarray:
    """Augment a uint8 ``(N, H, W, C)`` batch, each image with its own random parameters.

    Returns uint8 ``(N, H, W, C)``. Randomness comes only from ``generator``: the same seed
    gives the same batch. ``pre`` is accepted for symmetry with the decode step (the output
    size equals the input size).
    """
    del pre
    if len(pixels) == 0:
        return pixels
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float()
    n = len(x)
    if aug.rotation_degrees > 0 or aug.crop_padding > 0:
        x = _warp(x, aug, generator)
    if aug.hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).view(n, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    if aug.color_jitter > 0:
        x = _jitter(x, aug.color_jitter, generator)
    if aug.random_erasing > 0:
        x = _erase(x, aug.random_erasing, generator)
    return x.round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
