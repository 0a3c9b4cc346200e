"""Offline evaluation on exactly one split of the shards (driver side, no Ray needed).

- ``predictions``: run a model on a split; score training checkpoints on raw logits
  (``evaluate_checkpoint``, the train job's numbers).
- ``served``: score a bundle through the serving ``Predictor`` (temperature, prior correction,
  binary threshold), so an evaluation reports what serving will do (``evaluate_bundle``).
- ``calibration``: ``calibrate_bundle`` fits the temperature/threshold the Predictor applies.
"""

from imgpipe.evaluate.calibration import calibrate_bundle
from imgpipe.evaluate.predictions import (
    SplitPredictions,
    evaluate_checkpoint,
    load_checkpoint_model,
    predict_split,
    score_split,
)
from imgpipe.evaluate.served import (
    BEFORE_TEMPERATURE,
    CONFUSION_MATRIX,
    CONFUSION_MATRIX_NORMALIZED,
    LOGITS,
    METRICS_FILE,
    PREDICTION,
    PREDICTIONS_FILE,
    PROBABILITIES,
    SPLIT_PRIOR_CALIBRATION,
    TOP_K,
    BundleEvaluation,
    ShotThresholds,
    bundle_block,
    calibration_at_split_prior,
    compute_metrics,
    evaluate_bundle,
    evaluation_payload,
    load_predictor,
    run_evaluation,
    split_class_mix,
    write_evaluation,
)

__all__ = [
    "BEFORE_TEMPERATURE", "CONFUSION_MATRIX", "CONFUSION_MATRIX_NORMALIZED", "LOGITS",
    "METRICS_FILE", "PREDICTION", "PREDICTIONS_FILE", "PROBABILITIES", "SPLIT_PRIOR_CALIBRATION",
    "TOP_K", "BundleEvaluation", "ShotThresholds", "SplitPredictions",
    "bundle_block", "calibrate_bundle", "calibration_at_split_prior", "compute_metrics",
    "evaluate_bundle", "evaluate_checkpoint", "evaluation_payload", "load_checkpoint_model",
    "load_predictor", "predict_split", "run_evaluation", "score_split",
    "split_class_mix", "write_evaluation",
]
