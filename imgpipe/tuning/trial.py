"""One Tune trial: the training run built from the trial's parameters.

A one-worker trial (the default) runs the training loop in the trial's own actor
(``training.session.TrialSession``), which the search reuses from trial to trial: no Ray Train
controller, worker group or per-run helper actors (seven actor processes per trial with Ray
Train on two cores, each a Python start), and torch is imported once per actor, not per trial.
A trial of several workers is a Ray Train run (DDP), its metrics reaching Tune through
``TuneReportCallback``.

This module imports no torch, scikit-learn, SciPy or Optuna: Tune imports it in every trial
actor to unpickle ``run_trial``, and a DDP trial's actor never trains.
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


def trains_in_trial_actor(workers_per_trial: int) -> bool:
    """Whether a trial of this many workers runs its loop in the trial's own actor."""
    return workers_per_trial == 1


def run_trial(params: dict[str, Any], bases: dict[str, dict[str, Any]], num_classes: int,
              train_storage: str, decoded: list[DecodedSplits] | None = None) -> None:
    """One Tune trial: the training loop here (one worker), or a Ray Train run (several).

    ``bases`` maps each starting-weights choice (``""`` when weights are not searched) to the
    TrainConfig it starts from. ``decoded`` is the search's shared decoded train/val, one per
    distinct preprocessing (built once by ``run_search``); a trial only adds its own
    resampling and augmentation on top.
    """
    cfg = trial_config(bases[params.get("weights") or ""], params, num_classes)
    inputs = prepare_inputs(cfg, decoded)
    if trains_in_trial_actor(cfg.num_workers):
        from imgpipe.training.loop import train_loop  # torch: imported once per reused actor
        from imgpipe.training.session import TrialSession

        try:
            train_loop(inputs.loop_config, TrialSession(inputs.datasets))
        finally:
            inputs.close()
        return
    trial_id = tune.get_context().get_trial_id()
    try:
        trainer = build_trainer(inputs, name=f"train-{trial_id}", storage_path=train_storage,
                                callbacks=[TuneReportCallback()])
        trainer.fit()
    finally:
        inputs.close()
