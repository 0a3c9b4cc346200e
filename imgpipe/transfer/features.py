"""Penultimate-layer features of a data split, by Ray Data batch inference.

The shards are read with ``read_parquet`` and mapped by a callable class on an actor pool:
each actor loads the candidate once (``load_candidate``), decodes images with the candidate's
own preprocessing, and returns features, labels, ids and (when the candidate has one) its
source-head logits. Unusable images are skipped and counted, never fatal.

    feats = extract_features("bundles/digits/v1", "data/digits-lt", split="train")
    feats.features  # (N, D) float32
    feats.labels    # (N,) int64
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import ray
import torch

from imgpipe.constants import ID, IMAGE, LABEL, TRAIN
from imgpipe.data.manifest import load_manifest
from imgpipe.data.shards import split_files
from imgpipe.data.transforms import ImageDecodeError, Preprocess, decode_image, normalize
from imgpipe.transfer.candidate import Candidate, load_candidate

FEATURES = "features"
SOURCE_LOGITS = "source_logits"
SPLIT = "split"
OK = "ok"
_PATH = "path"


@dataclass
class Features:
    """Features of one split, rows sorted by image id (so repeated runs agree row by row).

    Attributes:
        features: float32 ``(N, D)`` penultimate-layer activations.
        labels: int64 ``(N,)`` target class indices.
        ids: the ``N`` image ids.
        source_logits: float32 ``(N, K)`` source-head logits, or None without a source head.
        skipped: images that could not be decoded (left out of the N rows).
    """

    features: np.ndarray
    labels: np.ndarray
    ids: list[str]
    source_logits: np.ndarray | None
    skipped: int = 0


def _column(name: str, i: int) -> str:
    return f"{name}_{i}"


class FeatureExtractor:
    """Ray Data callable class: each actor loads its candidates once, then maps shard batches.

    Several candidates share one pass (one read, one pool start-up, one decode per distinct
    preprocessing): candidate ``i`` writes columns ``features_i`` / ``source_logits_i`` /
    ``ok_i``. Every input row gives one output row; an image that cannot be decoded gets zero
    features and ``ok_i = 0`` so the driver can count it per split and leave it out.
    """

    def __init__(self, specs: list[str], target: Preprocess, seed: int, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        self.candidates: list[Candidate] = [load_candidate(s, target, seed=seed) for s in specs]
        self.dims = []
        for cand in self.candidates:
            pre = cand.preprocess
            feats, logits = cand.forward_features(
                torch.zeros(1, pre.channels, pre.image_size, pre.image_size))
            self.dims.append((feats.shape[1], logits.shape[1]))

    def _decode(self, images: np.ndarray, pre: Preprocess) -> tuple[np.ndarray, list[np.ndarray]]:
        ok = np.zeros(len(images), dtype=np.int8)
        pixels = []
        for i, data in enumerate(images):
            try:
                pixels.append(decode_image(bytes(data), pre))
                ok[i] = 1
            except ImageDecodeError:
                continue
        return ok, pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[LABEL])
        out = {LABEL: np.asarray(batch[LABEL], dtype=np.int64),
               ID: np.asarray([str(x) for x in batch[ID]], dtype=object),
               SPLIT: np.asarray(batch[SPLIT], dtype=object)}
        decoded: dict[Preprocess, tuple[np.ndarray, list[np.ndarray]]] = {}
        for i, (cand, (d, k)) in enumerate(zip(self.candidates, self.dims, strict=True)):
            pre = cand.preprocess
            if pre not in decoded:
                decoded[pre] = self._decode(batch[IMAGE], pre)
            ok, pixels = decoded[pre]
            feats, logits = np.zeros((n, d), np.float32), np.zeros((n, k), np.float32)
            if pixels:
                f, z = cand.forward_features(normalize(torch.from_numpy(np.stack(pixels)), pre))
                feats[ok == 1], logits[ok == 1] = f.numpy(), z.numpy()
            out[_column(FEATURES, i)], out[_column(SOURCE_LOGITS, i)] = feats, logits
            out[_column(OK, i)] = ok
        return out


class _SplitOfPath:
    """Maps a shard path as Ray Data reports it (absolute, maybe without the URI scheme) to the
    split whose manifest entry it ends with."""

    def __init__(self, files: dict[str, list[str]]) -> None:
        self.rel = [(rel.strip("/"), split) for split, rels in files.items() for rel in rels]
        self.cache: dict[str, str] = {}

    def __call__(self, path: str) -> str:
        if path not in self.cache:
            p = path.replace("\\", "/")
            hits = [split for rel, split in self.rel if p == rel or p.endswith("/" + rel)]
            if len(hits) != 1:
                raise ValueError(f"{path}: matches {len(hits)} manifest entries")
            self.cache[path] = hits[0]
        return self.cache[path]


def _tag_split(batch: dict[str, np.ndarray], files: dict[str, list[str]]) -> dict[str, np.ndarray]:
    split_of = _SplitOfPath(files)
    out = {k: v for k, v in batch.items() if k != _PATH}
    out[SPLIT] = np.asarray([split_of(str(p)) for p in batch[_PATH]], dtype=object)
    return out


def build_feature_dataset(specs: list[str], data_root: str, splits: Sequence[str], *,
                          num_actors: int = 1, cpus_per_actor: float = 1.0,
                          batch_size: int = 128, image_size: int = 32,
                          seed: int = 0) -> ray.data.Dataset:
    """The lazy Ray Data pipeline: one read of the splits' shards → ``FeatureExtractor`` actors.

    ``image_size`` (and the manifest's mode/mean/std) decode images for candidates that carry
    no preprocessing of their own (weight files, random inits).
    """
    manifest = load_manifest(data_root)
    paths = [p for split in splits for p in split_files(data_root, split, manifest)]
    # One read (one ListFiles task, which holds a whole CPU) for all splits.
    ds = (ray.data.read_parquet(paths, include_paths=True)
          .select_columns([IMAGE, LABEL, ID, _PATH])
          .map_batches(_tag_split, fn_kwargs={"files": {s: manifest.files[s] for s in splits}},
                       batch_format="numpy", batch_size=None))
    return ds.map_batches(
        FeatureExtractor,
        fn_constructor_kwargs={"specs": list(specs), "target": manifest.preprocess(image_size),
                               "seed": seed, "threads": max(1, int(cpus_per_actor))},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, num_actors)),
        num_cpus=cpus_per_actor, batch_size=batch_size, batch_format="numpy",
    )


def _collect(ds: ray.data.Dataset, splits: Sequence[str],
             heads: list[bool]) -> list[dict[str, Features]]:
    cols: dict[str, list[np.ndarray]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in batch.items():
            cols.setdefault(k, []).append(v)
    if not cols.get(LABEL):
        raise ValueError(f"no rows in split(s) {list(splits)}")
    data = {k: np.concatenate(v) for k, v in cols.items()}
    result = []
    for i, has_head in enumerate(heads):
        per_split = {}
        for split in splits:
            in_split = data[SPLIT] == split
            rows = np.flatnonzero(in_split & (data[_column(OK, i)] == 1))
            rows = rows[np.argsort(data[ID][rows].astype(str), kind="stable")]
            logits = data[_column(SOURCE_LOGITS, i)]
            per_split[split] = Features(
                features=np.ascontiguousarray(data[_column(FEATURES, i)][rows], np.float32),
                labels=data[LABEL][rows].astype(np.int64),
                ids=[str(x) for x in data[ID][rows]],
                source_logits=logits[rows].astype(np.float32) if has_head else None,
                skipped=int(in_split.sum() - len(rows)),
            )
        result.append(per_split)
    return result


def extract_many(candidates: Sequence[str], data_root: str, splits: Sequence[str] = (TRAIN,),
                 *, num_actors: int = 1, cpus_per_actor: float = 1.0, batch_size: int = 128,
                 image_size: int = 32, seed: int = 0) -> list[dict[str, Features]]:
    """Features of several candidates and splits in ONE Ray Data pass.

    Each actor of the pool loads every candidate once; images are decoded once per distinct
    preprocessing. Returns, per candidate (in order), split → ``Features``.

    Args:
        candidates: candidate specs (see ``imgpipe.transfer.candidate.load_candidate``).
        data_root: prepared shards (local path or ``s3://``/``gs://`` URI).
        splits: split names in the manifest.
        num_actors: maximum actor-pool size; ``cpus_per_actor``: CPUs each actor reserves
            (also its torch threads).
        image_size: decode size for candidates without their own preprocessing.
    Raises:
        CandidateError: a candidate cannot be loaded (checked on the driver first, so a bad
            candidate fails fast, before any actor starts; rank with ``extract_many`` only
            candidates that loaded).
        ManifestError: ``data_root`` is not a prepared shard folder or lacks a split.
    """
    manifest = load_manifest(data_root)
    target = manifest.preprocess(image_size)
    heads = [load_candidate(c, target, seed=seed).has_source_head for c in candidates]
    ds = build_feature_dataset(list(candidates), data_root, splits, num_actors=num_actors,
                               cpus_per_actor=cpus_per_actor, batch_size=batch_size,
                               image_size=image_size, seed=seed)
    return _collect(ds, splits, heads)


def extract_splits(candidate: str, data_root: str, splits: Sequence[str] = (TRAIN,),
                   **kwargs) -> dict[str, Features]:
    """Features of several splits of one candidate in one pass; see ``extract_many``."""
    return extract_many([candidate], data_root, splits, **kwargs)[0]


def extract_features(candidate: str, data_root: str, split: str = TRAIN, **kwargs) -> Features:
    """Penultimate features ``(N, D)`` float32 and labels ``(N,)`` of one split.

    ``extract_features(spec, root).features`` / ``.labels``; keyword arguments as for
    ``extract_many`` (``num_actors``, ``cpus_per_actor``, ``batch_size``, ``image_size``,
    ``seed``). Raises CandidateError / ManifestError (see ``extract_many``).
    """
    return extract_splits(candidate, data_root, (split,), **kwargs)[split]
