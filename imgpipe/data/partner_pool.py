"""The class-balanced partner pool for balanced MixUp / CutMix.

Balanced-MixUp (Galdran et al. 2021) and Remix (Chou et al. 2020) mix each training image with
a second image drawn from a *class-balanced* sampler, so tail classes are mixed in as often as
head classes. Ray Data has no weighted sampler, and with ``streaming_split`` a 1-image class
lives on one rank only, so the second sampler cannot be the stream itself. Instead the driver
draws a small fixed pool — up to ``per_class`` decoded images of every class, chosen by a pure
function of ``(seed, row id)`` — that every rank holds in full; the worker then draws partners
class-uniformly from it per ``(seed, epoch, rank)`` (``imgpipe.training.mixing``) and augments
each draw afresh.
"""

from __future__ import annotations

import logging

import numpy as np
import ray

from imgpipe.constants import LABEL, PIXELS
from imgpipe.data.rebalance import row_uniforms

log = logging.getLogger(__name__)

POOL_BYTES_BUDGET = 256 * 2**20  # the pool lives in every worker's memory
_POOL_EPOCH = -1  # a row_uniforms "epoch" no training epoch uses: the pool is fixed per run
_DRAW = "pool_draw"


def pool_per_class(counts: np.ndarray | list[int], per_class: int, image_bytes: int,
                   budget: int = POOL_BYTES_BUDGET) -> int:
    """Images kept per class: ``per_class``, lowered (to >= 1) so the pool fits ``budget``."""
    num_classes = max(1, int(np.count_nonzero(np.asarray(counts))))
    fit = max(1, budget // max(1, num_classes * image_bytes))
    if fit < per_class:
        log.warning("partner pool: %d images per class would exceed %d MiB; keeping %d",
                    per_class, budget // 2**20, fit)
    return int(min(per_class, fit))


def _mark_rows(batch: dict[str, np.ndarray], keep_prob: np.ndarray, seed: int,
               hash_column: str) -> dict[str, np.ndarray]:
    u = row_uniforms(batch[hash_column], seed, _POOL_EPOCH)
    keep = u < keep_prob[batch[LABEL]]
    return {PIXELS: batch[PIXELS][keep], LABEL: batch[LABEL][keep], _DRAW: u[keep]}


def build_partner_pool(decoded: ray.data.Dataset, counts: np.ndarray | list[int], per_class: int,
                       seed: int, hash_column: str = "id_hash") -> dict[str, np.ndarray]:
    """Up to ``per_class`` decoded train images of every class (all of a smaller class).

    Args:
        decoded: decoded train rows with ``pixels`` (uint8 HWC), ``label`` and a uint64
            ``hash_column`` (the stream's row-id hash).
        counts: train images per class (the manifest's counts; sets the keep rates).
        per_class: images to keep per class (>= 1).
        seed: the run seed; the same seed keeps the same rows.
    Returns:
        ``{"pixels": uint8 (M, H, W, C), "label": int64 (M,)}`` sorted by label, M <= C·per_class.
    Raises:
        ValueError: ``per_class`` < 1.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    n = np.asarray(counts, dtype=np.float64)
    # Over-keep by 1.5× (a Bernoulli filter in place, no shuffle), then trim exactly below.
    keep_prob = np.minimum(1.0, 1.5 * per_class / np.maximum(n, 1.0))
    marked = decoded.map_batches(
        _mark_rows, fn_kwargs={"keep_prob": keep_prob, "seed": seed, "hash_column": hash_column},
        batch_format="numpy")
    parts = list(marked.iter_batches(batch_size=None, batch_format="numpy"))
    parts = [b for b in parts if len(b[LABEL])]
    if not parts:
        raise ValueError("partner pool: the train split has no decodable images")
    pixels = np.concatenate([b[PIXELS] for b in parts])
    labels = np.concatenate([b[LABEL] for b in parts]).astype(np.int64)
    draw = np.concatenate([b[_DRAW] for b in parts])
    order = np.lexsort((draw, labels))  # by class, then by the seeded draw
    labels, pixels = labels[order], pixels[order]
    rank_in_class = np.arange(len(labels)) - np.searchsorted(labels, labels, side="left")
    keep = rank_in_class < per_class
    return {PIXELS: np.ascontiguousarray(pixels[keep]), LABEL: labels[keep]}
