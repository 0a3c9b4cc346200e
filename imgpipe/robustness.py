"""Robustness of a bundle under common image corruptions at three severities.

Corruptions (ImageNet-C's families, Hendrycks & Dietterich, ICLR 2019, at severities sized
for small images) are applied to the decoded uint8 pixels, before the model's normalisation,
with torchvision's ``transforms.v2.functional`` ops: ``gaussian_noise``, ``gaussian_blur``,
``jpeg``, ``adjust_brightness``, ``adjust_contrast``, ``rotate`` and ``erase`` (occlusion).
torchvision is already a dependency, its v2 ops are maintained, deterministic given their
parameters and work on uint8 tensors of any size; ``imagecorruptions`` hard-codes
ImageNet-sized parameters (and old scikit-image/Wand pins) and ``kornia`` would add a
dependency for the same operations.

Every corrupted image goes through the serving ``Predictor`` (temperature, prior correction,
threshold), so the numbers describe what serving would do on degraded inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from imgpipe.constants import BALANCED_ACCURACY, IMAGE, LABEL, PER_CLASS_RECALL
from imgpipe.data.shards import read_split_table
from imgpipe.data.transforms import ImageDecodeError, decode_image, normalize
from imgpipe.metrics import classification_metrics, confusion_matrix

SEVERITIES = (1, 2, 3)
# Parameters per severity 1, 2, 3.
LEVELS: dict[str, tuple[float, float, float]] = {
    "gaussian_noise": (0.04, 0.08, 0.16),  # σ on the [0, 1] scale
    "blur": (0.6, 1.0, 1.5),  # Gaussian σ in pixels
    "jpeg": (50, 25, 10),  # JPEG quality
    "brightness": (0.7, 0.5, 0.3),  # brightness factor (darker)
    "contrast": (0.7, 0.45, 0.25),  # contrast factor
    "rotation": (5.0, 10.0, 20.0),  # degrees, sign drawn per image
    "occlusion": (0.15, 0.25, 0.35),  # side of a black square, fraction of the image side
}
CORRUPTIONS = tuple(LEVELS)
CLEAN = "clean"


def corrupt(pixels: torch.Tensor, name: str, severity: int,
            generator: torch.Generator) -> torch.Tensor:
    """Corrupt a uint8 ``(N, C, H, W)`` batch; returns uint8 of the same shape.

    Raises:
        ValueError: unknown corruption or a severity outside 1..3.
    """
    if name not in LEVELS:
        raise ValueError(f"unknown corruption {name!r}; valid: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")
    level = LEVELS[name][severity - 1]
    if name == "gaussian_noise":
        x = TF.to_dtype(pixels, torch.float32, scale=True)
        noisy = (x + level * torch.randn(x.shape, generator=generator)).clamp_(0, 1)
        return TF.to_dtype(noisy, torch.uint8, scale=True)
    if name == "blur":
        k = 2 * math.ceil(2 * level) + 1
        return TF.gaussian_blur(pixels, kernel_size=[k, k], sigma=[level, level])
    if name == "jpeg":
        return TF.jpeg(pixels, quality=int(level))
    if name == "brightness":
        return TF.adjust_brightness(pixels, level)
    if name == "contrast":
        return TF.adjust_contrast(pixels, level)
    if name == "rotation":
        signs = torch.randint(0, 2, (len(pixels),), generator=generator) * 2 - 1
        # Bilinear: nearest-neighbour rotation of a small image by a few degrees can be a no-op.
        return torch.stack([TF.rotate(img, float(s) * level, InterpolationMode.BILINEAR)
                            for img, s in zip(pixels, signs, strict=True)])
    return _occlude(pixels, level, generator)


def _occlude(pixels: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    _, _, h, w = pixels.shape
    side_h, side_w = max(1, round(h * fraction)), max(1, round(w * fraction))
    out = pixels.clone()
    for i in range(len(out)):
        top = int(torch.randint(0, h - side_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - side_w + 1, (1,), generator=generator))
        out[i] = TF.erase(out[i], top, left, side_h, side_w, torch.zeros(()))
    return out


@dataclass
class _Split:
    pixels: torch.Tensor  # uint8 (N, C, H, W)
    labels: np.ndarray  # (N,)
    skipped: int


def _load(data_root: str, split: str, pre) -> _Split:
    table = read_split_table(data_root, split)
    images, labels = table[IMAGE].to_pylist(), table[LABEL].to_numpy()
    keep, arrays = [], []
    for i, data in enumerate(images):
        try:
            arrays.append(decode_image(data, pre))
            keep.append(i)
        except ImageDecodeError:
            continue
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return _Split(x, labels[keep].astype(np.int64), len(images) - len(keep))


def _score(predictor, pixels: torch.Tensor, labels: np.ndarray, batch: int = 256) -> dict:
    pre = predictor.meta.preprocess
    probs = np.concatenate([
        predictor.probabilities(predictor.predict_logits(normalize(pixels[i:i + batch], pre)))
        for i in range(0, len(pixels), batch)])
    cm = confusion_matrix(labels, predictor.predict_labels(probs), predictor.num_classes)
    m = classification_metrics(cm)
    return {BALANCED_ACCURACY: m[BALANCED_ACCURACY], PER_CLASS_RECALL: m[PER_CLASS_RECALL]}


def evaluate_robustness(predictor, data_root: str, split: str,
                        corruptions: tuple[str, ...] = CORRUPTIONS,
                        seed: int = 0) -> dict[str, Any]:
    """Balanced accuracy and per-class recall on ``split``, clean and under each corruption at
    each severity (seeded: the same seed corrupts the same pixels the same way).

    Returns:
        ``{"clean": {...}, "corruptions": {name: {"1": {...}, "2": ..., "3": ...}},
        "mean_corrupted_balanced_accuracy", "worst": {corruption, severity, value},
        "num_rows", "skipped_corrupt", "class_names"}``.
    """
    data = _load(data_root, split, predictor.meta.preprocess)
    result: dict[str, Any] = {CLEAN: _score(predictor, data.pixels, data.labels),
                              "corruptions": {}}
    values = []
    for k, name in enumerate(corruptions):
        result["corruptions"][name] = {}
        for severity in SEVERITIES:
            gen = torch.Generator().manual_seed(seed * 1_000 + k * 10 + severity)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1_000 + k * 10 + severity)
                x = corrupt(data.pixels, name, severity, gen)
            scores = _score(predictor, x, data.labels)
            result["corruptions"][name][str(severity)] = scores
            values.append((scores[BALANCED_ACCURACY], name, severity))
    worst = min(values)
    result.update(mean_corrupted_balanced_accuracy=float(np.mean([v[0] for v in values])),
                  worst={"corruption": worst[1], "severity": worst[2], "value": worst[0]},
                  num_rows=len(data.labels), skipped_corrupt=data.skipped,
                  class_names=list(predictor.class_names), split=split, seed=seed)
    return result


def robustness_rows(result: dict[str, Any]) -> list[list[Any]]:
    """Table rows: corruption, balanced accuracy at severity 1/2/3, worst class recall at 3."""
    rows = [[CLEAN, result[CLEAN][BALANCED_ACCURACY], "", "",
             min(result[CLEAN][PER_CLASS_RECALL])]]
    for name, by_sev in result["corruptions"].items():
        rows.append([name, *(by_sev[str(s)][BALANCED_ACCURACY] for s in SEVERITIES),
                     min(by_sev[str(SEVERITIES[-1])][PER_CLASS_RECALL])])
    return rows


ROBUSTNESS_HEADERS = ["corruption", "bal_acc_s1", "bal_acc_s2", "bal_acc_s3",
                      "worst_class_recall_s3"]


def plot_robustness(result: dict[str, Any], path: Path) -> Path:
    """Balanced accuracy vs severity, one line per corruption, the clean value dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, by_sev in result["corruptions"].items():
        ax.plot(SEVERITIES, [by_sev[str(s)][BALANCED_ACCURACY] for s in SEVERITIES],
                marker="o", label=name)
    ax.axhline(result[CLEAN][BALANCED_ACCURACY], ls="--", color="k", lw=1, label="clean")
    ax.set_xticks(SEVERITIES)
    ax.set_xlabel("severity")
    ax.set_ylabel(f"{result['split']} balanced accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("Robustness under corruptions")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


ROBUSTNESS_FILE, ROBUSTNESS_PLOT = "robustness.json", "robustness.png"


def write_robustness(predictor, data_root: str, split: str, out_dir: Path,
                     seed: int = 0) -> dict[str, Any]:
    """``evaluate_robustness`` written as ``robustness.json`` and ``robustness.png`` into
    ``out_dir``; returns the result with ``plot`` (the PNG's path) added."""
    import json

    result = evaluate_robustness(predictor, data_root, split, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ROBUSTNESS_FILE).write_text(json.dumps(result, indent=2))
    result["plot"] = str(plot_robustness(result, out_dir / ROBUSTNESS_PLOT))
    return result
