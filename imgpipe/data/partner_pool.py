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


def _draws(batch: dict[str, np.ndarray], seed: int, hash_column: str) -> dict[str, np.ndarray]:
    return {LABEL: batch[LABEL], _DRAW: row_uniforms(batch[hash_column], seed, _POOL_EPOCH)}


def _keep_rows(batch: dict[str, np.ndarray], cutoff: np.ndarray, seed: int,
               hash_column: str) -> dict[str, np.ndarray]:
    u = row_uniforms(batch[hash_column], seed, _POOL_EPOCH)
    keep = u <= cutoff[batch[LABEL]]
    return {PIXELS: batch[PIXELS][keep], LABEL: batch[LABEL][keep], _DRAW: u[keep]}


def _cutoffs(labels: np.ndarray, draws: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
    """Per class, the ``per_class``-th smallest draw (1.0 keeps a smaller class whole)."""
    cutoff = np.full(num_classes, -1.0)
    order = np.lexsort((draws, labels))
    labels, draws = labels[order], draws[order]
    for c in np.unique(labels):
        mine = draws[labels == c]
        cutoff[c] = 1.0 if len(mine) <= per_class else mine[per_class - 1]
    return cutoff


def build_partner_pool(decoded: ray.data.Dataset, counts: np.ndarray | list[int], per_class: int,
                       seed: int, hash_column: str = "id_hash") -> dict[str, np.ndarray]:
    """Up to ``per_class`` decoded train images of every class (all of a smaller class).

    Args:
        decoded: decoded train rows with ``pixels`` (uint8 HWC), ``label`` and a uint64
            ``hash_column`` (the stream's row-id hash).
        counts: train images per class (its length is the number of classes).
        per_class: images to keep per class (>= 1).
        seed: the run seed; the same seed keeps the same rows.
    Returns:
        ``{"pixels": uint8 (M, H, W, C), "label": int64 (M,)}`` sorted by label, M <= C·per_class.
    Raises:
        ValueError: ``per_class`` < 1.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    num_classes = len(counts)
    # Pass 1 moves only (label, draw) to the driver and fixes each class's cutoff exactly;
    # pass 2 keeps the rows under it where they are (no shuffle, no pixels moved for nothing).
    small = [b for b in decoded.select_columns([LABEL, hash_column]).map_batches(
        _draws, fn_kwargs={"seed": seed, "hash_column": hash_column}, batch_format="numpy",
    ).iter_batches(batch_size=None, batch_format="numpy") if len(b[LABEL])]
    if not small:
        raise ValueError("partner pool: the train split has no decodable images")
    cutoff = _cutoffs(np.concatenate([b[LABEL] for b in small]).astype(np.int64),
                      np.concatenate([b[_DRAW] for b in small]), num_classes, per_class)
    parts = [b for b in decoded.map_batches(
        _keep_rows, fn_kwargs={"cutoff": cutoff, "seed": seed, "hash_column": hash_column},
        batch_format="numpy").iter_batches(batch_size=None, batch_format="numpy")
        if len(b[LABEL])]
    pixels = np.concatenate([b[PIXELS] for b in parts])
    labels = np.concatenate([b[LABEL] for b in parts]).astype(np.int64)
    order = np.lexsort((np.concatenate([b[_DRAW] for b in parts]), labels))
    return {PIXELS: np.ascontiguousarray(pixels[order]), LABEL: labels[order]}
