"""The Ray Data stream: read shards → decode (once) → resample per class → augment → workers.

Fixed work (decode, resize) runs before ``materialize()``; random work (resampling, augmentation)
runs after it, so every epoch re-executes only the random part with a fresh (seed, epoch) draw.

How the epoch reaches the map tasks depends on who executes the stream:

- One rank executes it itself: each epoch the worker builds the stream from the decoded split
  with the epoch in the plan (``StreamPlan.epoch``), so the tasks read it from their arguments.
- Several ranks share one execution through ``streaming_split``, whose plan is fixed when the
  split is made; the epoch then reaches the tasks through a tiny named actor (``EpochClock``)
  that every rank sets before iterating: ``streaming_split`` starts an epoch only when all
  ranks have arrived, and ``ray.train.report`` is a barrier, so the clock is always set before
  the epoch's tasks run.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import ray

from imgpipe.config import Augment
from imgpipe.constants import CORRUPT, ID, IMAGE, LABEL, PIXELS
from imgpipe.data.manifest import load_manifest
from imgpipe.data.rebalance import id_hashes, repeat_counts, row_uniforms
from imgpipe.data.shards import split_files, split_rows
from imgpipe.data.transforms import ImageDecodeError, Preprocess, decode_image
from imgpipe.runtime import train_worker_runtime_env

ID_HASH = "id_hash"


@ray.remote(num_cpus=0)
class EpochClock:
    """Holds the current epoch of one training run for the resampling tasks to read."""

    def __init__(self) -> None:
        self._epoch = 0

    def set(self, epoch: int) -> None:
        self._epoch = epoch

    def get(self) -> int:
        return self._epoch


def start_epoch_clock() -> tuple[str, ray.actor.ActorHandle]:
    """Create a uniquely named clock owned by the calling process (it dies with the run)."""
    name = f"imgpipe-epoch-clock-{uuid.uuid4().hex[:12]}"
    return name, EpochClock.options(name=name).remote()


def set_epoch(clock_name: str, epoch: int) -> None:
    ray.get(ray.get_actor(clock_name).set.remote(epoch))


def decode_batch(batch: dict[str, np.ndarray], pre: Preprocess) -> dict[str, np.ndarray]:
    """Encoded bytes → uint8 pixels; an unusable image is flagged (``corrupt=1``), not raised."""
    n = len(batch[LABEL])
    shape = (pre.image_size, pre.image_size, pre.channels)
    pixels = np.zeros((n, *shape), dtype=np.uint8)
    corrupt = np.zeros(n, dtype=np.int8)
    for i, data in enumerate(batch[IMAGE]):
        try:
            pixels[i] = decode_image(bytes(data), pre)
        except ImageDecodeError:
            corrupt[i] = 1
    ids = [str(x) for x in batch[ID]]
    return {
        PIXELS: pixels,
        LABEL: np.asarray(batch[LABEL], dtype=np.int64),
        ID: np.asarray(ids, dtype=object),
        ID_HASH: id_hashes(ids),
        CORRUPT: corrupt,
    }


def drop_corrupt(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keep = batch[CORRUPT] == 0
    return {k: v[keep] for k, v in batch.items() if k != CORRUPT}


@dataclass(frozen=True)
class StreamPlan:
    """What the train-split tasks need; small and picklable."""

    rates: tuple[float, ...]  # expected copies per row, per class
    seed: int
    clock_name: str | None  # the EpochClock to read; None: ``epoch`` below
    augment: Augment | None
    preprocess: Preprocess
    epoch: int = 0


def resample_and_augment(batch: dict[str, np.ndarray], plan: StreamPlan) -> dict[str, np.ndarray]:
    """Repeat each row ``floor(r) + Bernoulli(frac r)`` times, then augment every copy afresh."""
    import torch  # here, not at the top: the coordinators that unpickle the plan need no torch

    from imgpipe.data.augment import augment_batch

    epoch = (ray.get(ray.get_actor(plan.clock_name).get.remote()) if plan.clock_name
             else plan.epoch)
    copies = repeat_counts(batch[LABEL], batch[ID_HASH], np.asarray(plan.rates), plan.seed, epoch)
    # Seed from the rows in the batch (order-independent), the run seed and the epoch.
    key = np.bitwise_xor.reduce(batch[ID_HASH]) if len(batch[ID_HASH]) else np.uint64(0)
    u = row_uniforms(np.asarray([key], dtype=np.uint64), plan.seed, epoch + 7_919)[0]
    gen = torch.Generator().manual_seed(int(u * 2**62))
    # Copies of a row would sit side by side (and land in one SGD batch): spread them out.
    idx = np.repeat(np.arange(len(copies)), copies)
    idx = idx[torch.randperm(len(idx), generator=gen).numpy()]
    out = {PIXELS: batch[PIXELS][idx], LABEL: batch[LABEL][idx]}
    if plan.augment is not None and len(idx):
        out[PIXELS] = augment_batch(out[PIXELS], plan.augment, plan.preprocess, gen)
    return out


def build_decoded(data_root: str, split: str, pre: Preprocess, *, cache: bool,
                  block_rows: int = 128, columns: Sequence[str] | None = None,
                  runtime_env: dict | None = None) -> tuple[ray.data.Dataset, int | None]:
    """Read and decode one split, dropping corrupt rows; with ``cache`` materialise it and
    count them. ``columns`` (default: all) are the ones kept. ``runtime_env`` (default:
    :func:`~imgpipe.runtime.train_worker_runtime_env`) is the one the read and decode tasks
    run with: that of the train workers that will stream the split, so they reuse the warm
    decode processes.

    Returns the dataset and the corrupt count (None when not cached: the stream then drops
    them silently each epoch and the count is not known up front).

    Raises:
        ManifestError: the split's files are missing or hold other rows than the manifest
            says (checked from the Parquet footers before any work).
    """
    manifest = load_manifest(data_root)
    rows = split_rows(data_root, split, manifest)
    # Exactly the files the manifest lists: stray files in the folder are not data.
    env = train_worker_runtime_env() if runtime_env is None else runtime_env
    remote = {"runtime_env": env} if env else {}
    ds = ray.data.read_parquet(split_files(data_root, split, manifest),
                               runtime_env=env or None).select_columns([IMAGE, LABEL, ID])
    decoded = ds.map_batches(
        decode_batch, fn_kwargs={"pre": pre}, batch_format="numpy", batch_size=block_rows,
        **remote,
    ).map_batches(drop_corrupt, batch_format="numpy", batch_size=None, **remote)
    if columns is not None:
        decoded = decoded.select_columns(list(columns))
    if not cache:
        return decoded, None
    # Materialised after the drop and the projection: iterating the cache then runs no task
    # at all (every epoch's val pass and the stream's first step read the blocks directly,
    # instead of waiting for a worker process to start and import torch).
    decoded = decoded.materialize()
    # The count of a materialised dataset comes from its block metadata (no task); an
    # aggregation would launch shuffle tasks, which a Tune trial's 0.01-CPU group cannot host.
    return decoded, rows - decoded.count()


def build_train_stream(decoded: ray.data.Dataset, plan: StreamPlan,
                       block_rows: int = 64) -> ray.data.Dataset:
    """The per-epoch random part; re-executed by Ray Train for every epoch."""
    return decoded.map_batches(
        resample_and_augment, fn_kwargs={"plan": plan}, batch_format="numpy",
        batch_size=block_rows,
    )
