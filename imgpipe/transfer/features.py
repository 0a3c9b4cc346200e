"""Penultimate-layer features of a data split, by Ray Data batch inference (minimal version).

Interim implementation written by the ``minority`` engineer for the classifier re-balancing
stage until the ``rank`` engineer's full version (candidate checkpoints of every kind) lands
here with the same API: ``extract_splits`` / ``extract_features`` → ``Features``.

Shards are read with ``read_parquet`` and mapped by a callable class on an actor pool: each
actor loads the bundle once (checksum verified, safetensors only), decodes images with the
bundle's own preprocessing, and returns the input of the ``fc`` head (read with a forward hook)
and the bundle's logits. Unusable images are skipped and counted, never fatal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import ray
import torch

from imgpipe.constants import ID, IMAGE, LABEL, TRAIN
from imgpipe.data.shards import split_files
from imgpipe.data.transforms import ImageDecodeError, decode_image, normalize

FEATURES, SOURCE_LOGITS, OK = "features", "source_logits", "ok"
HEAD = "fc"  # every registered model calls its classifier head ``fc`` (imgpipe.models)


@dataclass
class Features:
    """Features of one split, rows sorted by image id (repeated runs agree row by row).

    Attributes:
        features: float32 ``(N, D)`` penultimate activations (the input of ``fc``).
        labels: int64 ``(N,)``. ids: the N image ids.
        source_logits: float32 ``(N, K)`` logits of the bundle's own head.
        skipped: images that could not be decoded (left out of the N rows).
    """

    features: np.ndarray
    labels: np.ndarray
    ids: list[str]
    source_logits: np.ndarray | None
    skipped: int = 0


class FeatureExtractor:
    """Ray Data callable class: one bundle load per actor, then batches of shard rows."""

    def __init__(self, bundle: str, threads: int) -> None:
        from imgpipe.inference import Predictor

        torch.set_num_threads(max(1, threads))
        self.predictor = Predictor.load(bundle)
        self.model = self.predictor.model.eval()

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pre = self.predictor.meta.preprocess
        n = len(batch[LABEL])
        ok = np.zeros(n, dtype=np.int8)
        pixels = []
        for i, data in enumerate(batch[IMAGE]):
            try:
                pixels.append(decode_image(bytes(data), pre))
                ok[i] = 1
            except ImageDecodeError:
                continue
        head = getattr(self.model, HEAD)
        dims = (head.in_features, head.out_features)
        feats, logits = np.zeros((n, dims[0]), np.float32), np.zeros((n, dims[1]), np.float32)
        if pixels:
            seen: list[torch.Tensor] = []
            hook = head.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0]))
            try:
                z = self.model(normalize(torch.from_numpy(np.stack(pixels)), pre))
            finally:
                hook.remove()
            feats[ok == 1] = seen[0].flatten(1).float().numpy()
            logits[ok == 1] = z.float().numpy()
        return {FEATURES: feats, SOURCE_LOGITS: logits, OK: ok,
                LABEL: np.asarray(batch[LABEL], dtype=np.int64),
                ID: np.asarray([str(x) for x in batch[ID]], dtype=object)}


def _collect(ds: ray.data.Dataset) -> Features:
    cols: dict[str, list[np.ndarray]] = {k: [] for k in (FEATURES, SOURCE_LOGITS, LABEL, ID, OK)}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k in cols:
            cols[k].append(batch[k])
    if not cols[LABEL]:
        raise ValueError("no rows in the split")
    data = {k: np.concatenate(v) for k, v in cols.items()}
    rows = np.flatnonzero(data[OK] == 1)
    rows = rows[np.argsort(data[ID][rows].astype(str), kind="stable")]
    return Features(np.ascontiguousarray(data[FEATURES][rows]), data[LABEL][rows],
                    [str(i) for i in data[ID][rows]], data[SOURCE_LOGITS][rows],
                    int(len(data[OK]) - len(rows)))


def extract_splits(candidate: str, data_root: str, splits: Sequence[str] = (TRAIN,), *,
                   num_actors: int = 2, cpus_per_actor: float = 1.0, batch_size: int = 128,
                   image_size: int = 32, seed: int = 0) -> dict[str, Features]:
    """Features of several splits of prepared shards for a bundle (``bundles/<name>[/v<N>]``).

    ``image_size`` and ``seed`` are accepted for API compatibility (a bundle carries its own
    preprocessing and weights). Raises BundleError for an unreadable bundle (checked on the
    driver first, before any actor starts) and ManifestError for a bad data folder.
    """
    from imgpipe.bundle import resolve_bundle_dir, verify_bundle

    bundle = str(resolve_bundle_dir(candidate))
    verify_bundle(bundle)
    out = {}
    for split in splits:
        ds = ray.data.read_parquet(split_files(data_root, split)).select_columns([IMAGE, LABEL, ID])
        ds = ds.map_batches(
            FeatureExtractor, fn_constructor_kwargs={"bundle": bundle,
                                                     "threads": max(1, int(cpus_per_actor))},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, num_actors)),
            num_cpus=cpus_per_actor, batch_size=batch_size, batch_format="numpy")
        out[split] = _collect(ds)
    return out


def extract_features(candidate: str, data_root: str, split: str = TRAIN, **kwargs) -> Features:
    """Features ``(N, D)`` float32 and labels ``(N,)`` of one split; see ``extract_splits``."""
    return extract_splits(candidate, data_root, (split,), **kwargs)[split]
