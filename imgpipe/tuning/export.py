"""Best trial → versioned model bundle, verified by re-evaluating the fresh bundle."""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray.train

from imgpipe import storage
from imgpipe.bundle import publish_bundle_to, stage_bundle, update_staged_meta
from imgpipe.bundle_versions import discard
from imgpipe.checkpoint import load_meta, load_weights
from imgpipe.config import TrainConfig
from imgpipe.constants import (
    ACCURACY,
    BALANCED_ACCURACY,
    MACRO_F1,
    NLL,
    SUPPORT,
    TEST,
    VAL,
    VAL_LOSS,
    val_key,
)
from imgpipe.data.rebalance import class_weights, effective_prior, sampling_rates
from imgpipe.data.transforms import Preprocess
from imgpipe.errors import ImgpipeFailure
from imgpipe.evaluate import score_split
from imgpipe.inference import Predictor
from imgpipe.training.mixing import mixed_target_prior

VERIFIED_METRICS = (ACCURACY, BALANCED_ACCURACY, MACRO_F1)


class ExportVerificationError(ImgpipeFailure):
    """The exported bundle does not reproduce the trial's validation metrics."""


def best_checkpoint_dir(ckpt: ray.train.Checkpoint, dest: Path) -> Path:
    """Copy a trial's checkpoint (``TuneOutcome.best_checkpoint``) into ``dest``."""
    shutil.rmtree(dest, ignore_errors=True)
    ckpt.to_directory(str(dest))
    return dest


def model_prior_for(cfg: TrainConfig, counts: list[int]) -> np.ndarray:
    """The prior this training recipe makes the model predict for (see effective_prior)."""
    rates = sampling_rates(counts, cfg.sampler.strategy)
    weights = class_weights(counts, cfg.loss.class_weights)
    tau = cfg.loss.tau if cfg.loss.name == "logit-adjusted" else 0.0
    if not (cfg.mix.enabled and cfg.mix.partner == "balanced"):
        return effective_prior(counts, rates, weights, tau)
    # Balanced partners move part of every target towards uniform before weights/τ act.
    n = np.asarray(counts, dtype=np.float64)
    q = mixed_target_prior(effective_prior(counts, rates), cfg.mix) * weights
    q = q * np.where(n > 0, np.maximum(n, 1.0) ** -tau, 0.0)
    return q / q.sum()


def bundle_metrics(bundle_dir: Path, data_root: str, split: str) -> dict[str, Any]:
    """A freshly loaded bundle's raw-argmax metrics on one split (no calibration applied)."""
    predictor = Predictor.load(bundle_dir)
    return score_split(predictor.model, predictor.meta.preprocess, data_root, split,
                       predictor.num_classes)


# Share of val predictions that may flip between the trial's run and the export's re-evaluation
# (near-ties decided differently by another device, thread count or kernel), at least one.
FLIP_FRACTION = 1e-3
# NLL is a continuous check that the weights are the trial's: relative tolerance.
NLL_RTOL = 1e-3


def verification_tolerance(support: list[int], flip_fraction: float = FLIP_FRACTION
                           ) -> dict[str, float]:
    """How far each verified metric may move when ``k`` val predictions flip.

    ``k = max(1, ceil(flip_fraction * n))`` for a split of n images with per-class ``support``.
    One flip moves accuracy by 1/n, one class's recall by 1/n_c (balanced accuracy by
    1/(C·n_min)), and the F1 of the two classes involved by at most 2/n_a + 1/n_b (macro-F1 by
    3/(C·n_min)); classes absent from the split are not counted in C for balanced accuracy.
    """
    n = int(sum(support))
    present = [s for s in support if s > 0]
    if not present:
        return dict.fromkeys(VERIFIED_METRICS, 0.0)
    k = max(1, math.ceil(flip_fraction * n))
    n_min = min(present)
    return {ACCURACY: k / n, BALANCED_ACCURACY: k / (len(present) * n_min),
            MACRO_F1: 3 * k / (len(support) * n_min)}


def verify_bundle(bundle_dir: Path, data_root: str, reported: dict[str, Any]) -> dict[str, Any]:
    """Load the bundle fresh, re-evaluate on val, compare with the trial's report (or raise).

    Metrics may differ by the tolerance of ``verification_tolerance`` (a flipped near-tie on
    another device must not fail a long search); anything beyond it means the bundle is not
    the trial's model. The returned metrics carry the check under ``"verification"``.
    """
    fresh = bundle_metrics(bundle_dir, data_root, VAL)
    tol = verification_tolerance(fresh[SUPPORT])
    problems = [
        f"{m}: bundle {fresh[m]:.6f} vs trial {reported[val_key(m)]:.6f} (tolerance {tol[m]:.2g})"
        for m in VERIFIED_METRICS if abs(fresh[m] - reported[val_key(m)]) > tol[m] + 1e-12
    ]
    if abs(fresh[NLL] - reported[VAL_LOSS]) > NLL_RTOL * max(1.0, abs(reported[VAL_LOSS])):
        problems.append(f"{VAL_LOSS}: bundle {fresh[NLL]:.6f} vs trial {reported[VAL_LOSS]:.6f}")
    if problems:
        raise ExportVerificationError(
            "the exported model does not reproduce the trial's validation metrics, so no "
            "bundle was published: " + "; ".join(problems))
    fresh["verification"] = {
        "tolerance": tol, "nll_rtol": NLL_RTOL,
        "max_abs_diff": max(abs(fresh[m] - reported[val_key(m)]) for m in VERIFIED_METRICS)}
    return fresh


def stage_checkpoint(ckpt_dir: Path, stage_root: str, name: str,
                     extra_hyperparameters: dict[str, Any] | None = None) -> Path:
    """A training checkpoint as an unpublished bundle under ``stage_root`` (``stage_bundle``):
    its weights, architecture, preprocessing, class counts and the prior its recipe makes the
    model predict for; no metrics yet. The caller publishes or discards it."""
    meta = load_meta(ckpt_dir)
    cfg = TrainConfig.model_validate(meta["train"])
    pre = Preprocess.model_validate(meta["preprocess"])
    counts = list(meta["train_counts"])
    return stage_bundle(
        stage_root, name, load_weights(ckpt_dir),
        architecture={"model": cfg.model.name, "num_classes": len(meta["class_names"]),
                      "in_channels": pre.channels, "cifar_stem": cfg.model.cifar_stem},
        preprocess=pre, class_names=meta["class_names"], train_class_counts=counts,
        model_prior=model_prior_for(cfg, counts),
        hyperparameters={"train": meta["train"], "epoch": meta["epoch"],
                         **(extra_hyperparameters or {})},
        metrics={"val": {}, "test": {}},
    )


def export_bundle(ckpt_dir: Path, data_root: str, bundle_root: str, name: str,
                  extra_hyperparameters: dict[str, Any] | None = None,
                  finish: Callable[[Path], Any] | None = None) -> tuple[str, dict]:
    """Stage the checkpoint as a bundle, verify it, add test metrics, then publish it.

    ``finish(staged_dir)`` runs on the verified, staged bundle before it is published (the
    tune job calibrates it and writes its report there), so a published version is complete.

    The bundle is written to a staging folder and becomes ``<bundle_root>/<name>/v<N>`` (local
    or an object-store URI) only after verification passed; a failed verification publishes
    nothing and uses up no version number. Returns (published location, {"val", "test"}).

    Raises:
        ExportVerificationError: the staged bundle does not reproduce the trial's metrics.
    """
    reported = {k: v for k, v in load_meta(ckpt_dir).items() if k.startswith("val_")}
    with tempfile.TemporaryDirectory(prefix="imgpipe-export-") as tmp:
        stage_root = tmp if storage.is_uri(bundle_root) else storage.absolute_location(bundle_root)
        staged = stage_checkpoint(ckpt_dir, stage_root, name, extra_hyperparameters)
        try:
            val = verify_bundle(staged, data_root, reported)
            test = bundle_metrics(staged, data_root, TEST)
            update_staged_meta(staged, metrics={"val": val, "test": test})
            if finish is not None:
                finish(staged)
            location = publish_bundle_to(staged, bundle_root)
        finally:
            discard(staged)
    return location, {"val": val, "test": test}
