"""Refit: the configuration a search chose, retrained on train+val (AutoGluon's ``refit_full``).

A search chooses a configuration, and an epoch count, on val. On long-tailed data the val split
often holds more images of the rare classes than train does (digits-lt: 20 val images of each
class, 1 train image of its two rarest), and the chosen model never learns from them.
``benchmarks/headroom_bench.py`` measures what they are worth: the logit-adjusted recipe goes
from 0.859 to 0.965 test balanced accuracy when refit on train+val, with recall of the two
one-image classes going from 0.59 and 0.31 to 0.97 and 0.84. The same protocol is AutoGluon's
``refit_full`` and scikit-learn's ``GridSearchCV(refit=True)``: choose on held-out data, then
retrain on everything but test.

Test stays unseen, so its scores stay honest. Two things val can no longer measure:

* The refit model's val scores are in-sample. The bundle records the refit under
  ``hyperparameters["refit"]``, with the chosen trial's held-out val score, and its report and
  model card say so.
* Calibration. A temperature fitted on val by a model trained on val would measure in-sample
  confidence. The temperature (and a binary decision threshold) are therefore fitted on held-out
  val by the chosen trial's own model, and carried over to the refit model, which was trained
  with the same recipe.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgpipe.bundle import load_bundle_meta
from imgpipe.checkpoint import load_meta
from imgpipe.config import TrainConfig
from imgpipe.constants import val_key
from imgpipe.evaluate.calibration import calibrate_bundle
from imgpipe.training.trainer import run_training
from imgpipe.tuning.export import stage_checkpoint


@dataclass
class Refit:
    """A finished refit: its last checkpoint (a local copy), the calibration carried over from
    the chosen trial's model, and what the bundle records under ``hyperparameters["refit"]``."""

    checkpoint: Path
    temperature: float
    decision_threshold: float | None
    info: dict[str, Any]


def refit_config(selected_ckpt: Path, out: Path) -> TrainConfig:
    """The chosen trial's TrainConfig with ``refit`` on, for the epochs its checkpoint had.

    The trial's cosine schedule ran over the search's ``epochs``; the refit runs its own over
    the chosen epoch count, as AutoGluon's refit uses the chosen model's iteration count.
    """
    meta = load_meta(selected_ckpt)
    return TrainConfig.model_validate({
        **meta["train"], "refit": True, "epochs": int(meta["epoch"]) + 1, "out": str(out),
        "resume": None, "storage_path": None, "patience": None, "progress": True})


def held_out_calibration(selected_ckpt: Path, data_root: str) -> tuple[float, float | None]:
    """Temperature and binary decision threshold of the chosen trial's model, fitted on
    held-out val (``calibrate_bundle`` on a throw-away staged bundle of its checkpoint)."""
    with tempfile.TemporaryDirectory(prefix="imgpipe-selected-") as tmp:
        staged = stage_checkpoint(selected_ckpt, tmp, "selected")
        calibrate_bundle(staged, data_root)
        meta = load_bundle_meta(staged)
    return meta.temperature, meta.decision_threshold


def run_refit(selected_ckpt: Path, data_root: str, work: Path, trial_id: str,
              metric: str) -> Refit:
    """Calibrate the chosen trial's model on val, then retrain its configuration on train+val
    (a Ray Train run, ``run_training``) into ``work/refit``.

    Raises:
        TrainingFailed and what ``run_training`` raises; BundleError / DataSourceError as
        ``calibrate_bundle``.
    """
    started = time.perf_counter()
    temperature, threshold = held_out_calibration(selected_ckpt, data_root)
    selected = load_meta(selected_ckpt)
    cfg = refit_config(selected_ckpt, work / "refit")
    print(f"\nrefit: trial {trial_id}'s configuration on train+val for {cfg.epochs} epochs "
          f"(its checkpoint's); temperature {temperature:.4f} from its model on held-out val",
          flush=True)
    results = run_training(cfg)
    local = work / "refit_checkpoint"
    shutil.rmtree(local, ignore_errors=True)
    shutil.copytree(results["best_checkpoint"], local)
    info = {
        "splits": ["train", "val"], "epochs": cfg.epochs, "train_counts": results["train_counts"],
        "selected_trial": trial_id, "selected_epoch": int(selected["epoch"]),
        f"selected_{val_key(metric)}": selected[val_key(metric)],
        "calibration": "temperature and threshold of the selected trial's model, on held-out val",
        "val_scores": "in-sample (val is in the training data)",
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    return Refit(local, temperature, threshold, info)
