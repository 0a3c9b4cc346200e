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
from imgpipe.data.shards import load_manifest, split_files
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


class FeatureExtractor:
    """Ray Data callable class: one candidate load per actor, then batches of shard rows.

    Every input row gives one output row; an image that cannot be decoded gets zero features
    and ``ok = 0`` so the driver can count it per split and leave it out.
    """

    def __init__(self, spec: str, target: Preprocess, seed: int, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        self.candidate: Candidate = load_candidate(spec, target, seed=seed)
        pre = self.candidate.preprocess
        probe = torch.zeros(1, pre.channels, pre.image_size, pre.image_size)
        feats, logits = self.candidate.forward_features(probe)
        self.dims = (feats.shape[1], logits.shape[1])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pre = self.candidate.preprocess
        n = len(batch[LABEL])
        ok = np.zeros(n, dtype=np.int8)
        pixels = []
        for i, data in enumerate(batch[IMAGE]):
            try:
                pixels.append(decode_image(bytes(data), pre))
                ok[i] = 1
            except ImageDecodeError:
                continue
        feats = np.zeros((n, self.dims[0]), np.float32)
        logits = np.zeros((n, self.dims[1]), np.float32)
        if pixels:
            f, z = self.candidate.forward_features(normalize(torch.from_numpy(np.stack(pixels)), pre))
            feats[ok == 1], logits[ok == 1] = f.numpy(), z.numpy()
        return {
            FEATURES: feats,
            SOURCE_LOGITS: logits,
            LABEL: np.asarray(batch[LABEL], dtype=np.int64),
            ID: np.asarray([str(x) for x in batch[ID]], dtype=object),
            SPLIT: np.asarray(batch[SPLIT], dtype=object),
            OK: ok,
        }


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


def build_feature_dataset(spec: str, data_root: str, splits: Sequence[str], *,
                          num_actors: int = 2, cpus_per_actor: float = 1.0,
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
        fn_constructor_kwargs={"spec": spec, "target": manifest.preprocess(image_size),
                               "seed": seed, "threads": max(1, int(cpus_per_actor))},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, num_actors)),
        num_cpus=cpus_per_actor, batch_size=batch_size, batch_format="numpy",
    )


def _collect(ds: ray.data.Dataset, splits: Sequence[str],
             has_head: bool) -> dict[str, Features]:
    cols: dict[str, list[np.ndarray]] = {k: [] for k in (FEATURES, SOURCE_LOGITS, LABEL, ID,
                                                          SPLIT, OK)}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k in cols:
            cols[k].append(batch[k])
    if not cols[LABEL]:
        raise ValueError(f"no rows in split(s) {list(splits)}")
    data = {k: np.concatenate(v) for k, v in cols.items()}
    out = {}
    for split in splits:
        in_split = data[SPLIT] == split
        rows = np.flatnonzero(in_split & (data[OK] == 1))
        rows = rows[np.argsort(data[ID][rows].astype(str), kind="stable")]
        out[split] = Features(
            features=np.ascontiguousarray(data[FEATURES][rows], dtype=np.float32),
            labels=data[LABEL][rows].astype(np.int64),
            ids=[str(i) for i in data[ID][rows]],
            source_logits=data[SOURCE_LOGITS][rows].astype(np.float32) if has_head else None,
            skipped=int(in_split.sum() - len(rows)),
        )
    return out


def extract_splits(candidate: str, data_root: str, splits: Sequence[str] = (TRAIN,), *,
                   num_actors: int = 2, cpus_per_actor: float = 1.0, batch_size: int = 128,
                   image_size: int = 32, seed: int = 0) -> dict[str, Features]:
    """Features of several splits in one Ray Data pass (one actor pool, one load per actor).

    Args:
        candidate: a candidate spec (see ``imgpipe.transfer.candidate.load_candidate``).
        data_root: prepared shards (local path or ``s3://``/``gs://`` URI).
        splits: split names in the manifest.
        num_actors: maximum actor-pool size; ``cpus_per_actor``: CPUs each actor reserves
            (also its torch threads).
        image_size: decode size for candidates without their own preprocessing.
    Returns:
        split → ``Features`` (rows sorted by id; undecodable images counted in ``skipped``).
    Raises:
        CandidateError: the candidate cannot be loaded (checked on the driver first, so a bad
            candidate fails fast, before any actor starts).
        ManifestError: ``data_root`` is not a prepared shard folder or lacks a split.
    """
    manifest = load_manifest(data_root)
    cand = load_candidate(candidate, manifest.preprocess(image_size), seed=seed)
    ds = build_feature_dataset(candidate, data_root, splits, num_actors=num_actors,
                               cpus_per_actor=cpus_per_actor, batch_size=batch_size,
                               image_size=image_size, seed=seed)
    return _collect(ds, splits, cand.has_source_head)


def extract_features(candidate: str, data_root: str, split: str = TRAIN, **kwargs) -> Features:
    """Features ``(N, D)`` float32 and labels ``(N,)`` of one split; see ``extract_splits``."""
    return extract_splits(candidate, data_root, (split,), **kwargs)[split]
