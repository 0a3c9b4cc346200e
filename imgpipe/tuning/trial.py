"""One Tune trial: a Ray Train run built from the trial's parameters.

Tune starts a fresh actor for every trial and imports this module there, to unpickle
``run_trial``. It imports no torch, scikit-learn, SciPy or Optuna: the trial only resolves its
config and hands the run to Ray Train, whose worker imports the training loop. Those imports
were most of a trial actor's start-up (a median 4.6–7.3 s, against 1.5 s without them, in a
2-trial-at-a-time search on two cores; the run's controller starts after it).
"""

from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from imgpipe.config import TrainConfig, resolve_config
from imgpipe.training.trainer import DecodedSplits, build_trainer, prepare_inputs
from imgpipe.tuning.space import params_to_overrides


def trial_config(base: dict[str, Any], params: dict[str, Any], num_classes: int) -> TrainConfig:
    return resolve_config(TrainConfig, None, {**_flatten(base), **params_to_overrides(
        params, num_classes)})


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def run_trial(params: dict[str, Any], bases: dict[str, dict[str, Any]], num_classes: int,
              train_storage: str, decoded: list[DecodedSplits] | None = None) -> None:
    """One Tune trial: build and fit a Ray Train trainer; metrics reach Tune via the callback.

    ``bases`` maps each starting-weights choice (``""`` when weights are not searched) to the
    TrainConfig it starts from. ``decoded`` is the search's shared decoded train/val, one per
    distinct preprocessing (built once by ``run_search``); a trial only adds its own
    resampling and augmentation on top.
    """
    cfg = trial_config(bases[params.get("weights") or ""], params, num_classes)
    trial_id = tune.get_context().get_trial_id()
    inputs = prepare_inputs(cfg, decoded)
    try:
        trainer = build_trainer(inputs, name=f"train-{trial_id}", storage_path=train_storage,
                                callbacks=[TuneReportCallback()])
        trainer.fit()
    finally:
        inputs.close()
