"""Fitting a bundle's temperature (and binary threshold) on val and storing them in it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imgpipe.bundle import BundleError, DeploymentPrior, update_bundle_meta, val_in_sample
from imgpipe.calibrate import ThresholdMode, choose_threshold, fit_temperature
from imgpipe.config.specs import parse_prior
from imgpipe.constants import VAL
from imgpipe.errors import DataSourceError
from imgpipe.evaluate.predictions import predict_split
from imgpipe.evaluate.served import (
    bundle_block,
    calibration_at_split_prior,
    load_predictor,
    split_class_mix,
)
from imgpipe.inference import prior_shift


def calibrate_bundle(bundle_dir: str | Path, data_root: str, *,
                     deployment_prior: DeploymentPrior | str | None = None,
                     threshold_mode: ThresholdMode | None = "max_f1",
                     target_recall: float = 0.9) -> dict[str, Any]:
    """Fit the temperature (and, for 2 classes, the decision threshold) on the val split and
    store them in ``bundle.json`` via ``update_bundle_meta``; serving then applies them.

    T is fitted on raw logits (re-running gives the same T) with the prior corrected to the
    validation class mix, so T measures over/under-confidence only and stays valid whichever
    deployment prior is chosen later. The threshold is chosen on the probabilities the
    Predictor gives with the new T and the deployment prior, which is stored too when given
    (a threshold is only meaningful for its prior). ``threshold_mode=None`` clears it.

    Returns:
        ``calibration_at_split_prior`` on val (without the bins) plus ``"decision_threshold",
        "threshold_mode", "target_recall", "deployment_prior"``.
    Raises:
        BundleError / ManifestError as for ``run_evaluation``, or a bundle refit on train+val
        (``imgpipe.bundle.val_in_sample``); ValueError: an empty val split, or a binary val
        split without positives.
    """
    predictor = load_predictor(bundle_dir, parse_prior(deployment_prior))
    meta = predictor.meta
    in_sample = val_in_sample(meta, "calibrating")
    if in_sample:
        raise BundleError(f"{in_sample}; its temperature was fitted on held-out val by the "
                          "model the search chose, before the refit")
    preds = predict_split(predictor.model, meta.preprocess, data_root, VAL)
    if preds.labels.size == 0:
        raise DataSourceError(f"{data_root}: the val split has no decodable image to calibrate on")
    c = meta.architecture.num_classes
    fit_meta = meta.model_copy(update={"deployment_prior": split_class_mix(preds.labels, c)})
    t = fit_temperature(preds.logits, preds.labels, prior_shift(fit_meta))
    predictor.set_adjustment(temperature=t)
    threshold = None
    if c == 2 and threshold_mode is not None:
        probs = predictor.probabilities(preds.logits)
        threshold = choose_threshold(probs[:, 1], preds.labels, threshold_mode, target_recall)
    update_bundle_meta(bundle_dir, temperature=t, deployment_prior=meta.deployment_prior,
                       decision_threshold=threshold)
    return {
        **bundle_block(calibration_at_split_prior(preds.logits, preds.labels, predictor.meta)),
        "decision_threshold": threshold,
        "threshold_mode": threshold_mode if threshold is not None else None,
        "target_recall": target_recall if threshold is not None and threshold_mode == "recall"
        else None,
        "deployment_prior": meta.deployment_prior,
    }
