"""Best trial → versioned model bundle, verified by re-evaluating the fresh bundle."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import ray.train

from imgpipe.bundle import save_bundle, update_bundle_meta
from imgpipe.config import TrainConfig
from imgpipe.constants import (
    ACCURACY,
    BALANCED_ACCURACY,
    MACRO_F1,
    METRIC_MODES,
    NLL,
    TEST,
    VAL,
    VAL_LOSS,
    val_key,
)
from imgpipe.data.rebalance import class_weights, effective_prior, sampling_rates
from imgpipe.data.transforms import Preprocess
from imgpipe.evaluate import score_split
from imgpipe.inference import Predictor
from imgpipe.training.checkpoint import load_meta, load_weights
from imgpipe.training.mixing import mixed_target_prior

VERIFIED_METRICS = (ACCURACY, BALANCED_ACCURACY, MACRO_F1)


class ExportVerificationError(RuntimeError):
    """The exported bundle does not reproduce the trial's validation metrics."""


def best_checkpoint_dir(train_storage: str, trial_id: str, metric: str, dest: Path) -> Path:
    """Copy the best epoch's checkpoint of one trial's Train run into ``dest``."""
    result = ray.train.Result.from_path(f"{train_storage.rstrip('/')}/train-{trial_id}")
    ckpt = result.get_best_checkpoint(val_key(metric), METRIC_MODES[metric])
    if ckpt is None:
        raise RuntimeError(f"trial {trial_id} has no checkpoint scored by {val_key(metric)}")
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


def verify_bundle(bundle_dir: Path, data_root: str, reported: dict[str, Any]) -> dict[str, Any]:
    """Load the bundle fresh, re-evaluate on val, compare with the trial's report (or raise)."""
    fresh = bundle_metrics(bundle_dir, data_root, VAL)
    problems = [
        f"{m}: bundle {fresh[m]:.6f} vs trial {reported[val_key(m)]:.6f}"
        for m in VERIFIED_METRICS if abs(fresh[m] - reported[val_key(m)]) > 1e-9
    ]
    if abs(fresh[NLL] - reported[VAL_LOSS]) > 1e-4 * max(1.0, abs(reported[VAL_LOSS])):
        problems.append(f"{VAL_LOSS}: bundle {fresh[NLL]:.6f} vs trial {reported[VAL_LOSS]:.6f}")
    if problems:
        raise ExportVerificationError(
            f"bundle {bundle_dir} does not reproduce the trial's validation metrics: "
            + "; ".join(problems))
    return fresh


def export_bundle(ckpt_dir: Path, data_root: str, bundle_root: str, name: str,
                  extra_hyperparameters: dict[str, Any] | None = None) -> tuple[Path, dict]:
    """Write the checkpoint as the next bundle version, verify it, add test metrics.

    A bundle that fails verification is removed and ExportVerificationError raised.
    """
    meta = load_meta(ckpt_dir)
    cfg = TrainConfig.model_validate(meta["train"])
    pre = Preprocess.model_validate(meta["preprocess"])
    counts = list(meta["train_counts"])
    reported = {k: v for k, v in meta.items() if k.startswith("val_")}
    path = save_bundle(
        bundle_root, name, load_weights(ckpt_dir),
        architecture={"model": cfg.model.name, "num_classes": len(meta["class_names"]),
                      "in_channels": pre.channels, "cifar_stem": cfg.model.cifar_stem},
        preprocess=pre, class_names=meta["class_names"], train_class_counts=counts,
        model_prior=model_prior_for(cfg, counts),
        hyperparameters={"train": meta["train"], "epoch": meta["epoch"],
                         **(extra_hyperparameters or {})},
        metrics={"val": {}, "test": {}},
    )
    try:
        val = verify_bundle(path, data_root, reported)
    except Exception:
        shutil.rmtree(path, ignore_errors=True)
        raise
    test = bundle_metrics(path, data_root, TEST)
    update_bundle_meta(path, metrics={"val": val, "test": test})
    return path, {"val": val, "test": test}
