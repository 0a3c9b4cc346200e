"""Predictions on one split of the shards, and checkpoints scored on raw logits.

``predict_split`` decodes a split (corrupt images skipped and counted) and runs a model on it;
``evaluate_checkpoint`` scores a training checkpoint (the train job's val/test numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imgpipe.checkpoint import load_meta, load_weights
from imgpipe.constants import ID, IMAGE, LABEL, NLL
from imgpipe.data.shards import read_split_table
from imgpipe.data.transforms import ImageDecodeError, Preprocess, decode_image, normalize
from imgpipe.metrics import classification_metrics, confusion_matrix
from imgpipe.models import create_model


@dataclass
class SplitPredictions:
    ids: list[str]
    labels: np.ndarray  # (N,) int64
    logits: np.ndarray  # (N, C) float32, before any temperature/prior adjustment
    skipped: int  # corrupt images left out (counted, never fatal)


@torch.no_grad()
def predict_split(model: torch.nn.Module, pre: Preprocess, data_root: str, split: str,
                  batch_size: int = 256) -> SplitPredictions:
    """Logits for every decodable image of ``split``, in shard order."""
    model.eval()
    table = read_split_table(data_root, split)
    images, labels, ids = table[IMAGE].to_pylist(), table[LABEL].to_numpy(), table[ID].to_pylist()
    keep_ids, keep_labels, chunks, skipped = [], [], [], 0
    pixels: list[np.ndarray] = []

    def flush() -> None:
        if pixels:
            x = normalize(torch.from_numpy(np.stack(pixels)), pre)
            chunks.append(model(x).float().numpy())
            pixels.clear()

    for data, label, ident in zip(images, labels, ids, strict=True):
        try:
            pixels.append(decode_image(data, pre))
        except ImageDecodeError:
            skipped += 1
            continue
        keep_ids.append(ident)
        keep_labels.append(int(label))
        if len(pixels) == batch_size:
            flush()
    flush()
    logits = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    return SplitPredictions(keep_ids, np.asarray(keep_labels, dtype=np.int64), logits, skipped)


def load_checkpoint_model(ckpt_dir: str | Path) -> tuple[torch.nn.Module, Preprocess, dict]:
    """Rebuild the model of a training checkpoint (weights-only) with its preprocessing."""
    meta = load_meta(ckpt_dir)
    pre = Preprocess.model_validate(meta["preprocess"])
    mcfg = meta["train"]["model"]
    model = create_model(mcfg["name"], len(meta["class_names"]), in_channels=pre.channels,
                         cifar_stem=mcfg["cifar_stem"], image_size=pre.image_size)
    model.load_state_dict(load_weights(ckpt_dir))
    return model.eval(), pre, meta


def score_split(model: torch.nn.Module, pre: Preprocess, data_root: str, split: str,
                num_classes: int) -> dict[str, Any]:
    """Raw-argmax metrics of ``model`` on one split, plus the unweighted CE of its logits (NLL)
    — the numbers training reports per epoch, so checkpoints and bundles can be compared."""
    preds = predict_split(model, pre, data_root, split)
    out = classification_metrics(
        confusion_matrix(preds.labels, preds.logits.argmax(1), num_classes))
    out[NLL] = float(F.cross_entropy(torch.from_numpy(preds.logits).double(),
                                     torch.from_numpy(preds.labels))) if preds.labels.size else None
    out["num_rows"] = len(preds.labels)
    out["skipped_corrupt"] = preds.skipped
    return out


def evaluate_checkpoint(ckpt_dir: str | Path, data_root: str, split: str) -> dict[str, Any]:
    """Metrics of a training checkpoint on one split (argmax of the raw logits)."""
    model, pre, meta = load_checkpoint_model(ckpt_dir)
    return score_split(model, pre, data_root, split, len(meta["class_names"]))


# ---------------------------------------------------------------------------------------------
# bundles: evaluation through the Predictor (the serving path), calibration on val
# ---------------------------------------------------------------------------------------------
