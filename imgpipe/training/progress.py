"""What a train run prints while it runs: one line per epoch, from the Train controller (or,
for a one-worker run hosted by Tune, from ``trial_run.RunProgress`` in the driver).

Train callbacks are unpickled by the controller process; this module (like
``imgpipe.training.recovery``) imports no torch, so that process starts without it.
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from imgpipe.constants import (
    ACCURACY,
    BALANCED_ACCURACY,
    EPOCH,
    MACRO_F1,
    TRAIN_LOSS,
    VAL_LOSS,
    val_key,
)


class EpochProgress(UserCallback):
    """One line per epoch, printed once by the Train controller (not by every rank)."""

    def __init__(self, epochs: int, in_sample: bool = False) -> None:
        # in_sample (a refit on train+val): val scores are not held out, so no "*best" mark
        self.epochs = epochs
        self.mark_best = not in_sample

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        print(epoch_line(metrics[0], self.epochs, self.mark_best), flush=True)


def epoch_line(m: dict[str, Any], epochs: int, mark_best: bool = True) -> str:
    """One epoch's report as a console line (``mark_best``: flag an improved val score)."""
    return (f"epoch {m[EPOCH] + 1:>3}/{epochs}  train_loss {m[TRAIN_LOSS]:.4f}  "
            f"val_loss {m[VAL_LOSS]:.4f}  val_acc {m[val_key(ACCURACY)]:.4f}  "
            f"val_bal_acc {m[val_key(BALANCED_ACCURACY)]:.4f}  "
            f"val_macro_f1 {m[val_key(MACRO_F1)]:.4f}  rows {m['train_rows']}  "
            f"{m.get('epoch_s', float('nan')):.1f}s"
            f"{'  *best' if m['is_best'] and mark_best else ''}")
