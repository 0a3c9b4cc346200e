"""The prediction log: one Parquet row per served image, written in the background.

A replica hands each forward pass's logits and penultimate features to ``PredictionLogger.record``
(a sampled copy into a bounded in-memory buffer: it never waits on disk or network, never
raises). A daemon thread turns buffered batches into rows (calibrated probabilities, served
decision, margin, entropy, float16 embedding; format in ``imgpipe.prediction_log_format``) and
writes one Parquet file per flush through pyarrow's filesystems (local path, ``s3://``,
``gs://``). When the buffer is full new rows are dropped and counted; ``close()`` (replica
shutdown) flushes what is left.

The same module exposes the monitor's latest estimates as Prometheus gauges: the monitor job
writes ``<log>/_monitor/status.json`` and ``MonitorGauges`` reads it at scrape time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import uuid
import zlib
from collections import deque
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from prometheus_client import CollectorRegistry, Gauge
from pydantic import BaseModel, ConfigDict, Field

from imgpipe import storage
from imgpipe.bundle import BundleMeta
from imgpipe.errors import OutputLocationError
from imgpipe.inference import Predictor, adjusted_probabilities
from imgpipe.prediction_log_format import (
    LOG_SCHEMA,
    MONITOR_DIR,
    MONITOR_STATUS_FILE,
    calibrated_probabilities,
    encode_model_input,
    margin_and_entropy,
    part_name,
)

log = logging.getLogger(__name__)


class PredictionLogSettings(BaseModel):
    """``prediction_log:`` in ``serving/config.yaml`` args (``--prediction-log LOGDIR``)."""

    model_config = ConfigDict(extra="forbid")

    location: str = Field(min_length=1, description="folder: local path, s3://, gs://")
    sample_rate: float = Field(1.0, gt=0, le=1, description="fraction of images logged")
    max_buffer_rows: int = Field(20_000, ge=1, description="beyond this new rows are dropped")
    flush_rows: int = Field(2_000, ge=1, description="write a file once this many rows wait")
    flush_interval_s: float = Field(5.0, gt=0, description="... or this long after the last")
    embedding: bool = Field(True, description="log penultimate features (float16)")
    images: bool = Field(False, description="log the model input as PNG (active learning)")
    seed: int = 0


def resolve_prediction_log(settings: PredictionLogSettings | None
                           ) -> PredictionLogSettings | None:
    """Settings with a local location made absolute (replicas run elsewhere) and the folder
    created, so an unusable location fails at deploy time, not in every replica.

    Raises:
        ValueError: an unknown URI scheme; OutputLocationError: a folder that cannot be made.
    """
    if settings is None:
        return None
    location = settings.location
    if "://" not in location:
        location = os.path.abspath(os.path.expanduser(location))
    fs, root = storage.resolve_fs(location)
    try:
        fs.create_dir(root, recursive=True)
    except OSError as e:
        raise OutputLocationError(
            f"prediction_log.location {location}: cannot create it: {e}") from None
    return settings.model_copy(update={"location": location})


class _Batch:
    """One forward pass waiting to be written (raw arrays; rows are built off the hot path)."""

    __slots__ = ("embedding", "images", "logits", "meta", "time")

    def __init__(self, logits: np.ndarray, embedding: np.ndarray | None, meta: BundleMeta,
                 when: datetime, images: np.ndarray | None = None) -> None:
        self.logits, self.embedding, self.meta, self.time = logits, embedding, meta, when
        self.images = images


class PredictionLogger:
    """Bounded, sampled, background Parquet writer for one replica (thread-safe).

    Counters (``stats()``): ``logged`` rows accepted, ``written`` rows in files, ``dropped``
    (buffer full), ``failed`` (write errors; those rows are lost, the replica keeps serving),
    ``files``.
    """

    def __init__(self, settings: PredictionLogSettings, replica: str | None = None) -> None:
        self.settings = settings
        self.replica = replica or f"r{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._fs, self._root = storage.resolve_fs(settings.location)
        self._fs.create_dir(self._root, recursive=True)
        self._local = settings.location.find("://") < 0 or settings.location.startswith("file://")
        # crc32, not hash(): str hashes are salted per process, the sample must be seeded.
        self._rng = np.random.default_rng([settings.seed, zlib.crc32(self.replica.encode())])
        self._queue: deque[_Batch] = deque()
        self._queued_rows = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._seq = 0
        self._counts = {"logged": 0, "written": 0, "dropped": 0, "failed": 0, "files": 0}
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    # ----- hot path ---------------------------------------------------------------------------

    def record(self, logits: torch.Tensor | np.ndarray, embedding: torch.Tensor | None,
               meta: BundleMeta, images: torch.Tensor | None = None) -> None:
        """Queue a sampled copy of one forward pass; never blocks on I/O, never raises."""
        try:
            z = np.asarray(logits.numpy() if isinstance(logits, torch.Tensor) else logits)
            keep = np.flatnonzero(self._rng.random(len(z)) < self.settings.sample_rate)
            if keep.size == 0:
                return
            emb = None
            if embedding is not None and self.settings.embedding:
                emb = embedding.detach().cpu().numpy()[keep].astype(np.float16)
            pix = None
            if images is not None and self.settings.images:
                pix = images.detach().cpu().numpy()[keep].copy()
            batch = _Batch(z[keep].copy(), emb, meta, datetime.now(timezone.utc), pix)
            with self._lock:
                if self._queued_rows + keep.size > self.settings.max_buffer_rows:
                    self._counts["dropped"] += int(keep.size)
                    return
                self._queue.append(batch)
                self._queued_rows += int(keep.size)
                self._counts["logged"] += int(keep.size)
                if self._queued_rows >= self.settings.flush_rows:
                    self._wake.set()
        except Exception as e:  # logging must never fail a request
            log.warning("prediction log: could not record a batch: %s", e)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._counts, "buffered": self._queued_rows}

    # ----- background writer ------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.flush_interval_s)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Write everything queued so far as one Parquet file (called by the writer thread)."""
        with self._lock:
            batches, self._queue = list(self._queue), deque()
            n = self._queued_rows
            self._queued_rows = 0
        if not batches:
            return
        try:
            self._write(rows_table(batches, self.replica))
            with self._lock:
                self._counts["written"] += n
                self._counts["files"] += 1
        except Exception as e:
            with self._lock:
                self._counts["failed"] += n
            log.warning("prediction log: lost %d rows, could not write to %s: %s",
                        n, self.settings.location, e)

    def _write(self, table: pa.Table) -> None:
        name = part_name(datetime.now(timezone.utc), self.replica, self._seq)
        self._seq += 1
        final = f"{self._root}/{name}"
        # Local: write a hidden temp file and rename, so a reader never sees half a file.
        # Object stores publish an object only when its upload completes.
        target = f"{self._root}/_tmp-{name}" if self._local else final
        with self._fs.open_output_stream(target) as out:
            pq.write_table(table, out, compression="zstd")
        if target != final:
            self._fs.move(target, final)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop the writer thread and flush what is left (replica shutdown)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        self.flush()


def _list_column(mat: np.ndarray, typ: pa.DataType) -> pa.Array:
    """``(N, D)`` → a list<typ> column without per-row Python objects."""
    n, d = mat.shape
    offsets = pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(mat).reshape(-1),
                                                      type=typ))


def rows_table(batches: list[_Batch], replica: str) -> pa.Table:
    """Queued forward passes → a ``LOG_SCHEMA`` table (one row per image).

    Built column-wise from numpy (the writer thread shares the replica's CPU, so per-row
    Python work would eat into serving throughput).
    """
    parts: dict[str, list[Any]] = {k: [] for k in ("time", "name", "version", "predicted",
                                                   "index", "calibrated", "prior", "temperature", "served",
                                                   "margin", "entropy", "embedding", "image")}
    for b in batches:
        meta, n = b.meta, len(b.logits)
        served = adjusted_probabilities(b.logits, meta)
        if meta.decision_threshold is not None:
            idx = (served[:, 1] >= meta.decision_threshold).astype(np.int64)
        else:
            idx = served.argmax(axis=1)
        margin, entropy = margin_and_entropy(served)
        parts["time"].append(np.full(n, np.datetime64(b.time.replace(tzinfo=None), "us")))
        parts["name"] += [meta.name] * n
        parts["version"] += [str(meta.version)] * n
        parts["predicted"] += [meta.class_names[i] for i in idx]
        parts["index"].append(idx)
        parts["calibrated"].append(calibrated_probabilities(b.logits, meta.temperature))
        parts["prior"] += [json.dumps(meta.deployment_prior)] * n
        parts["temperature"] += [meta.temperature] * n
        parts["served"].append(served[np.arange(n), idx])
        parts["margin"].append(margin)
        parts["entropy"].append(entropy)
        parts["embedding"].append(b.embedding)
        pre = meta.preprocess
        parts["image"] += ([encode_model_input(im, pre.mean, pre.std) for im in b.images]
                           if b.images is not None else [None] * n)
    n_rows = len(parts["name"])
    embs = parts["embedding"]
    if all(e is not None for e in embs) and len({e.shape[1] for e in embs}) == 1:
        embedding = _list_column(np.concatenate(embs).astype(np.float16), pa.float16())
    else:
        rows = [None if e is None else list(r)
                for e, b in zip(embs, batches, strict=True)
                for r in (e if e is not None else range(len(b.logits)))]
        embedding = pa.array(rows, pa.list_(pa.float16()))
    cat = np.concatenate
    columns = [
        pa.array(cat(parts["time"]), pa.timestamp("us", tz="UTC")),
        pa.array(parts["name"], pa.string()), pa.array(parts["version"], pa.string()),
        pa.array([replica] * n_rows, pa.string()), pa.array(parts["predicted"], pa.string()),
        pa.array(cat(parts["index"]).astype(np.int32)),
        _list_column(cat(parts["calibrated"]).astype(np.float32), pa.float32()),
        pa.array(parts["prior"], pa.string()),
        pa.array(parts["temperature"], pa.float32()),
        pa.array(cat(parts["served"]).astype(np.float32)),
        pa.array(cat(parts["margin"]).astype(np.float32)),
        pa.array(cat(parts["entropy"]).astype(np.float32)),
        embedding, pa.array(parts["image"], pa.binary()),
    ]
    return pa.Table.from_arrays(columns, schema=LOG_SCHEMA)


class LoggedForward:
    """``predict_logits`` that also hands logits + penultimate features to the logger.

    The features are the input of the classifier head ``fc`` (every imgpipe model has one),
    caught by a forward pre-hook into thread-local storage: the forward pass runs in worker
    threads, concurrently for different batches.
    """

    def __init__(self, predictor: Predictor, logger: PredictionLogger) -> None:
        self.predictor, self.logger = predictor, logger
        self._local = threading.local()
        head = getattr(predictor.model, "fc", None)
        if isinstance(head, torch.nn.Module) and logger.settings.embedding:
            head.register_forward_pre_hook(self._catch)

    def _catch(self, _module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self._local.features = args[0].flatten(1).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._local.features = None
        logits = self.predictor.predict_logits(x)
        self.logger.record(logits, self._local.features, self.predictor.meta, x)
        return logits


# ----- /metrics: log counters and the monitor's estimates ---------------------------------------


class MonitorGauges:
    """``imgpipe_monitor_*``: the monitor job's latest estimates as Prometheus gauges, read
    from ``<log>/_monitor/status.json`` when ``/metrics`` is asked (re-parsed only when it
    changed; a missing or unreadable file leaves the gauges as they were). The replicas' own
    log counters are Ray metrics (``serving.metrics.ReplicaMetrics.prediction_log``).
    """

    def __init__(self, registry: CollectorRegistry, location: str) -> None:
        self._path = storage.join(location, MONITOR_DIR, MONITOR_STATUS_FILE)
        self._seen: str | None = None
        self.prior = Gauge("imgpipe_monitor_estimated_prior",
                           "Class prior of served traffic estimated by the monitor",
                           ["label", "method"], registry=registry)
        self.drift = Gauge("imgpipe_monitor_drift_statistic",
                           "Embedding drift statistic (MMD^2) of the last monitor window",
                           registry=registry)
        self.drift_p = Gauge("imgpipe_monitor_drift_p_value",
                             "Permutation p-value of the embedding drift test", registry=registry)
        self.prior_p = Gauge("imgpipe_monitor_prior_p_value",
                             "p-value of the test 'class prior unchanged'", registry=registry)
        self.alert = Gauge("imgpipe_monitor_alert", "1 when the retraining criteria are met",
                           registry=registry)
        self.updated = Gauge("imgpipe_monitor_updated_timestamp_seconds",
                             "When the monitor wrote these values", registry=registry)

    def refresh(self) -> None:
        with contextlib.suppress(Exception):
            fs, path = storage.resolve_fs(self._path)
            with fs.open_input_stream(path) as f:
                text = f.read().decode()
            if text == self._seen:
                return
            status = json.loads(text)
            for method, prior in (status.get("estimated_prior") or {}).items():
                for label, value in prior.items():
                    self.prior.labels(label, method).set(float(value))
            for gauge, key in ((self.drift, "drift_statistic"), (self.drift_p, "drift_p_value"),
                               (self.prior_p, "prior_p_value"), (self.alert, "alert"),
                               (self.updated, "updated_at")):
                if status.get(key) is not None:
                    gauge.set(float(status[key]))
            self._seen = text
