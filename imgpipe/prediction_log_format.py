"""The prediction log's on-disk format: the contract between the Serve app and the monitor.

The app (``serving/prediction_log.py``) writes it; ``imgpipe.monitoring`` reads it. Both sit
beside each other above the bundle layer, so the format lives here, below both, and neither
imports the other.

A log is a folder (local path or ``s3://`` / ``gs://`` URI) of Parquet files named
``part-<UTC yyyymmddTHHMMSSffffff>Z-<replica>-<seq>.parquet`` (lexical order = time order), one
row per served image, columns as in ``LOG_SCHEMA``. Files whose names start with ``_`` or ``.``
are work in progress or side files (``_monitor/``) and are never rows.
"""

from __future__ import annotations

import re
from datetime import datetime

import numpy as np
import pyarrow as pa
from scipy.special import softmax

LOG_FORMAT_VERSION = 1
PART_PREFIX = "part-"
PART_SUFFIX = ".parquet"
PART_NAME = re.compile(r"^part-(\d{8}T\d{12})Z-[A-Za-z0-9_.-]+-\d+\.parquet$")
MONITOR_DIR = "_monitor"  # side folder in the log: the monitor's latest status for /metrics
MONITOR_STATUS_FILE = "status.json"

# Columns (one row per served image).
TIME = "time"  # timestamp[us, UTC] when the forward pass finished
MODEL_NAME = "model_name"
MODEL_VERSION = "model_version"
REPLICA = "replica"
PREDICTED = "predicted"  # served decision (class name): argmax or binary threshold
PREDICTED_INDEX = "predicted_index"
PROBABILITIES = "probabilities"  # calibrated: softmax(logits / T), no prior correction
DEPLOYMENT_PRIOR = "deployment_prior"  # the prior in effect when served (JSON text)
TEMPERATURE = "temperature"  # the T of PROBABILITIES (the app's, which --apply-prior may change)
SERVED_PROBABILITY = "served_probability"  # probability of the served decision
MARGIN = "margin"  # top-1 minus top-2 of the served (prior-corrected) probabilities
ENTROPY = "entropy"  # of the served probabilities, nats
EMBEDDING = "embedding"  # penultimate features (input of the classifier head), float16
IMAGE = "image"  # optional: PNG of the model input (as the model saw it), for active learning

LOG_SCHEMA = pa.schema([
    pa.field(TIME, pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field(MODEL_NAME, pa.string()),
    pa.field(MODEL_VERSION, pa.string()),
    pa.field(REPLICA, pa.string()),
    pa.field(PREDICTED, pa.string()),
    pa.field(PREDICTED_INDEX, pa.int32()),
    pa.field(PROBABILITIES, pa.list_(pa.float32())),
    pa.field(DEPLOYMENT_PRIOR, pa.string()),
    pa.field(TEMPERATURE, pa.float32()),
    pa.field(SERVED_PROBABILITY, pa.float32()),
    pa.field(MARGIN, pa.float32()),
    pa.field(ENTROPY, pa.float32()),
    pa.field(EMBEDDING, pa.list_(pa.float16())),
    pa.field(IMAGE, pa.binary()),
], metadata={b"imgpipe_prediction_log": str(LOG_FORMAT_VERSION).encode()})
REQUIRED_COLUMNS = (TIME, PREDICTED_INDEX, PROBABILITIES, MARGIN, ENTROPY)


def part_name(when: datetime, replica: str, seq: int) -> str:
    """File name of one flushed batch (``when`` in UTC)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", replica)[:64] or "replica"
    return f"{PART_PREFIX}{when.strftime('%Y%m%dT%H%M%S%f')}Z-{safe}-{seq:06d}{PART_SUFFIX}"


def part_time(name: str) -> datetime | None:
    """The UTC time encoded in a part file's name, or None when it is not a part file."""
    m = PART_NAME.match(name)
    if not m:
        return None
    from datetime import timezone

    return datetime.strptime(m.group(1), "%Y%m%dT%H%M%S%f").replace(tzinfo=timezone.utc)


def encode_model_input(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> bytes:
    """One normalised model input ``(C, S, S)`` → PNG bytes of its pixels (``x · std + mean``)."""
    import io

    from PIL import Image

    pix = x * np.asarray(std)[:, None, None] + np.asarray(mean)[:, None, None]
    arr = np.clip(np.round(pix * 255.0), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def margin_and_entropy(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``(N, C)`` probabilities: top-1 minus top-2 and Shannon entropy (nats)."""
    p = np.asarray(probs, dtype=np.float64)
    top2 = -np.partition(-p, 1, axis=1)[:, :2]
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return top2[:, 0] - top2[:, 1], ent


def calibrated_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(logits / T)`` float64 ``(N, C)``: the probabilities the model's own prior
    (``bundle.model_prior``) stands behind — the input of BBSE/EM label-shift estimation."""
    return softmax(np.asarray(logits, dtype=np.float64) / float(temperature), axis=1)
