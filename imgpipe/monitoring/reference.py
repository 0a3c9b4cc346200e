"""The monitor's reference: what the bundle's model does on held-out, labelled images.

``init_reference`` (``jobs/monitor.py --init-reference DATA``) runs the bundle's ``Predictor`` on
the data's validation split (test for a bundle refit on train+val) once and writes
``<bundle>/monitor/reference.parquet``: per image the true label, the calibrated probabilities
(``softmax(z / T)``, the model's own prior) and the penultimate embedding. Everything the
monitor needs follows from it: the BBSE confusion matrix P(ŷ | y) for any deployment prior,
recall under any decision rule, and the reference sample for the drift test.

Why a monitor-side step writing into the bundle (and not at export time): it works for every
bundle ever exported, needs only the bundle and its data, and keeps the data flowing one way —
the bundle layer does not learn about monitoring, and monitoring reads the bundle like serving
does. ``bundle.json`` and the weights are not touched (their checksum stays valid).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from imgpipe.bundle import BundleMeta, resolve_bundle_dir, val_in_sample
from imgpipe.constants import IMAGE, LABEL, TEST, VAL
from imgpipe.data.shards import read_split_table
from imgpipe.data.transforms import ImageDecodeError
from imgpipe.errors import UserError
from imgpipe.inference import Predictor
from imgpipe.prediction_log_format import calibrated_probabilities

REFERENCE_DIR = "monitor"
REFERENCE_FILE = "reference.parquet"
REFERENCE_INFO = "reference.json"


class ReferenceError(UserError, FileNotFoundError):
    """The bundle has no monitor reference yet (run ``--init-reference DATA``)."""


@dataclass
class Reference:
    """Held-out predictions of the bundle: ``labels (M,)``, ``probabilities (M, C)`` calibrated,
    ``embeddings (M, D)`` float32 (or None when the model has no ``fc`` head)."""

    labels: np.ndarray
    probabilities: np.ndarray
    embeddings: np.ndarray | None
    info: dict


def penultimate_and_logits(predictor: Predictor, x: torch.Tensor
                           ) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits ``(N, C)`` and the classifier head's input ``(N, D)`` (None without ``fc``)."""
    caught: list[torch.Tensor] = []
    head = getattr(predictor.model, "fc", None)
    handle = head.register_forward_pre_hook(
        lambda _m, args: caught.append(args[0].flatten(1).float())) if head is not None else None
    try:
        logits = predictor.predict_logits(x).numpy()
    finally:
        if handle is not None:
            handle.remove()
    return logits, (caught[0].cpu().numpy() if caught else None)


def init_reference(bundle: str | Path, data: str, split: str | None = None,
                   batch_size: int = 256) -> Path:
    """Write ``<bundle>/monitor/reference.parquet`` (+ ``reference.json``) from ``split``.

    ``split`` defaults to val, or to test for a bundle refit on train+val, whose val
    predictions are in-sample (a near-diagonal BBSE confusion matrix, over-confident
    probabilities; ``imgpipe.bundle.val_in_sample``). Undecodable images are skipped and
    counted in ``reference.json``.

    Raises:
        BundleError: unreadable bundle; ManifestError: unreadable data.
    """
    bundle_dir = resolve_bundle_dir(bundle)
    predictor = Predictor.load(bundle_dir)
    if split is None:
        split = TEST if val_in_sample(predictor.meta, "a reference") else VAL
    table = read_split_table(data, split)
    images, labels = table[IMAGE].to_pylist(), table[LABEL].to_numpy()
    probs, embs, keep, skipped = [], [], [], 0
    for start in range(0, len(images), batch_size):
        xs, ok = [], []
        for i in range(start, min(start + batch_size, len(images))):
            try:
                xs.append(predictor.preprocess([images[i]]))
                ok.append(i)
            except ImageDecodeError:
                skipped += 1
        if not xs:
            continue
        logits, emb = penultimate_and_logits(predictor, torch.cat(xs))
        probs.append(calibrated_probabilities(logits, predictor.meta.temperature))
        embs.append(emb)
        keep += ok
    return save_reference(bundle_dir, predictor.meta, labels[keep], np.concatenate(probs),
                          None if embs[0] is None else np.concatenate(embs),
                          {"data": data, "split": split, "skipped_corrupt": skipped})


def save_reference(bundle_dir: Path, meta: BundleMeta, labels: np.ndarray, probs: np.ndarray,
                   embeddings: np.ndarray | None, info: dict) -> Path:
    out = Path(bundle_dir) / REFERENCE_DIR
    out.mkdir(exist_ok=True)
    cols = {"label": pa.array(labels.astype(np.int32)),
            "probabilities": pa.array(list(probs.astype(np.float32)), pa.list_(pa.float32()))}
    if embeddings is not None:
        cols["embedding"] = pa.array(list(embeddings.astype(np.float32)), pa.list_(pa.float32()))
    tmp = out / f".{REFERENCE_FILE}.tmp"
    pq.write_table(pa.table(cols), tmp)
    tmp.replace(out / REFERENCE_FILE)
    counts = np.bincount(labels, minlength=meta.architecture.num_classes).tolist()
    info = {**info, "rows": int(len(labels)), "class_counts": counts,
            "bundle": f"{meta.name} v{meta.version}", "temperature": meta.temperature,
            "created_at": datetime.now(timezone.utc).isoformat()}
    (out / REFERENCE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out / REFERENCE_FILE


def load_reference(bundle: str | Path) -> Reference:
    """Read the reference written by ``init_reference``.

    Raises:
        ReferenceError: there is none yet.
    """
    out = resolve_bundle_dir(bundle) / REFERENCE_DIR
    if not (out / REFERENCE_FILE).is_file():
        raise ReferenceError(
            f"{out / REFERENCE_FILE} does not exist: run `python jobs/monitor.py --bundle "
            f"{bundle} --init-reference DATA` once (DATA = the bundle's prepared data)")
    t = pq.read_table(out / REFERENCE_FILE)
    emb = (np.asarray(t["embedding"].to_pylist(), dtype=np.float32)
           if "embedding" in t.column_names else None)
    return Reference(t["label"].to_numpy().astype(np.int64),
                     np.asarray(t["probabilities"].to_pylist(), dtype=np.float64), emb,
                     json.loads((out / REFERENCE_INFO).read_text()))


def stratified_sample(labels: np.ndarray, prior: np.ndarray, seed: int,
                      max_size: int | None = None) -> np.ndarray:
    """Row indices drawn without replacement so class shares follow ``prior`` (C,).

    The size is the largest the per-class pools allow (class c limits it to n_c / prior_c),
    capped at ``max_size``. Without replacement, because repeated rows would look like a
    tighter distribution than fresh images and bias any two-sample test.
    """
    prior = np.asarray(prior, dtype=np.float64) / np.sum(prior)
    counts = np.bincount(labels, minlength=len(prior))
    with np.errstate(divide="ignore"):
        size = float(np.min(np.where(prior > 0, counts / np.where(prior > 0, prior, 1), np.inf)))
    if max_size is not None:
        size = min(size, max_size)
    rng = np.random.default_rng(seed)
    take = np.floor(prior * size + 1e-9).astype(int)
    out = [rng.choice(np.flatnonzero(labels == c), k, replace=False)
           for c, k in enumerate(take) if k > 0]
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)
