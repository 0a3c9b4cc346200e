"""Offline evaluation on exactly one split of the shards (driver side, no Ray needed).

- ``predictions``: run a model on a split; score training checkpoints on raw logits
  (``evaluate_checkpoint``, the train job's numbers).
- ``served``: score a bundle through the serving ``Predictor`` (temperature, prior correction,
  binary threshold), so an evaluation reports what serving will do (``evaluate_bundle``).
- ``calibration``: ``calibrate_bundle`` fits the temperature/threshold the Predictor applies.

A submodule is imported when one of its names is first used (PEP 562 ``__getattr__``): the
train job's final evaluation needs ``predictions`` (torch, scikit-learn) and not the bundle,
serving imports behind ``served`` and ``calibration`` (about 1 s of the 8.6 s the import took
at the end of every train run on a 2-core laptop; torch and scikit-learn are the rest).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_SUBMODULES: dict[str, tuple[str, ...]] = {
    "calibration": ("calibrate_bundle",),
    "predictions": ("SplitPredictions", "evaluate_checkpoint", "load_checkpoint_model",
                    "predict_split", "score_split"),
    "served": ("BEFORE_TEMPERATURE", "BundleEvaluation", "CONFUSION_MATRIX",
               "CONFUSION_MATRIX_NORMALIZED", "LOGITS", "METRICS_FILE", "PREDICTION",
               "PREDICTIONS_FILE", "PROBABILITIES", "SPLIT_PRIOR_CALIBRATION", "ShotThresholds",
               "TOP_K", "bundle_block", "calibration_at_split_prior", "compute_metrics",
               "evaluate_bundle", "evaluation_payload", "load_predictor", "run_evaluation",
               "split_class_mix", "write_evaluation"),
}
_HOME = {name: module for module, names in _SUBMODULES.items() for name in names}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})


if TYPE_CHECKING:  # the names, for type checkers and editors
    from imgpipe.evaluate.calibration import calibrate_bundle  # noqa: F401
    from imgpipe.evaluate.predictions import (  # noqa: F401
        SplitPredictions,
        evaluate_checkpoint,
        load_checkpoint_model,
        predict_split,
        score_split,
    )
    from imgpipe.evaluate.served import (  # noqa: F401
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
