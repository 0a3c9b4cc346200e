"""A one-worker train run hosted by a one-trial Ray Tune run: the loop trains in the trial actor.

Ray Train runs even a one-worker run through a controller actor, a worker actor, a
placement-group cleaner, a synchronization actor and a dataset manager: process starts that,
with torch imported in the worker, were most of a short run's fixed cost on a 2-core laptop
(``benchmarks/train_bench.py``). One worker needs no process group, so the train job hosts the
loop in the actor of a one-trial Tune run instead (``training.session.TrialSession``, the host a
one-worker search trial already uses). Tune gives the run what the train job took from Ray
Train, in one process:

* storage: checkpoints persisted under ``<storage_path>/<name>/run``;
* the best checkpoints kept by the val metric (``CheckpointConfig``; a refit keeps its latest);
* failure recovery: an actor that dies is restarted from the latest reported checkpoint,
  ``max_failures`` times (``FailureConfig``), and the loop records the restore.

A run of several workers stays a Ray Train run (DDP, ``trainer.build_trainer``).
"""

from __future__ import annotations

from typing import Any

import ray
from ray import tune

from imgpipe.config import TrainConfig
from imgpipe.constants import EPOCH
from imgpipe.errors import ImgpipeError
from imgpipe.training.progress import epoch_line
from imgpipe.training.recovery import (
    RESUME_KEY,
    failure_line,
    kept_checkpoints,
    stage_resume_checkpoint,
)

# The one trial's folder under the run's experiment folder (Tune's default name holds the
# trainable's name, an id and a timestamp).
TRIAL_DIR = "run"


def host_loop(config: dict[str, Any], loop_config: dict[str, Any],
              datasets: dict[str, ray.data.Dataset]) -> None:
    """The trial's function: the training loop in this actor (torch is imported here)."""
    from imgpipe.training.loop import train_loop
    from imgpipe.training.session import TrialSession

    train_loop(loop_config, TrialSession(datasets))


class RunProgress(tune.Callback):
    """The train job's console for a run hosted by Tune: one line per epoch, and a line per
    failure saying what happens next. Runs in the driver (Tune's controller)."""

    def __init__(self, epochs: int, max_failures: int, *, progress: bool = True,
                 in_sample: bool = False) -> None:
        self.epochs, self.max_failures = epochs, max_failures
        self.progress, self.mark_best = progress, not in_sample

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if self.progress and EPOCH in result:
            print(epoch_line(result, self.epochs, self.mark_best), flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._failed(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._failed(trial)

    def _failed(self, trial) -> None:
        # Tune has counted this failure (``run_metadata.num_failures``) before the callback;
        # every report carries a checkpoint, so the last result's epoch is the latest one's.
        error = trial_error_line(trial, "the trial actor died")
        kind, _, reason = error.partition(": ")
        last = (trial.last_result or {}).get(EPOCH)
        print(failure_line(trial.num_failures, self.max_failures,
                           None if last is None else int(last), "0",
                           kind or "Error", reason or error), flush=True)


def last_line(text: str, limit: int = 200) -> str:
    """The last non-blank line of ``text`` (an error's text: its last line names it), cut to
    ``limit`` characters; ``""`` for blank text."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return lines[-1][:limit] if lines else ""


def trial_error_line(trial, default: str = "error") -> str:
    """The last line of a failed Tune trial's error file, or ``default`` without one."""
    try:
        with open(trial.error_file) as f:
            return last_line(f.read()) or default
    except (OSError, TypeError):
        return default


class RunInterrupted(ImgpipeError):
    """The run was stopped (Ctrl-C) before it ended; the message names the checkpoint that
    ``--resume`` continues from. ``epochs_line``: how far it got, e.g. "interrupted after
    epoch 2 of 30"."""

    def __init__(self, epochs_line: str, checkpoint: str | None) -> None:
        self.epochs_line, self.checkpoint = epochs_line, checkpoint
        resume = f"; continue it with --resume {checkpoint}" if checkpoint else ""
        super().__init__(f"training {epochs_line}{resume}")


def fit_in_trial_actor(cfg: TrainConfig, datasets: dict[str, ray.data.Dataset],
                       loop_config: dict[str, Any], *, name: str, storage_path: str,
                       resources: dict[str, float]) -> tune.Result:
    """Run the loop for ``cfg`` (a one-worker ``TrainConfig``) in a one-trial Tune run.

    Returns Tune's ``Result`` of the trial: ``checkpoint`` (the latest), ``get_best_checkpoint``,
    ``error`` (set when it failed after its restarts).

    Raises:
        RunInterrupted: Tune stopped the trial on Ctrl-C (it returns, rather than raising, what
            the trial had reported); the run must not be scored and published as finished.
    """
    if cfg.resume:
        loop_config = {**loop_config,
                       RESUME_KEY: stage_resume_checkpoint(cfg.resume, storage_path, name)}
    trainable = tune.with_resources(
        tune.with_parameters(host_loop, loop_config=loop_config, datasets=datasets), resources)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(num_samples=1, trial_dirname_creator=_trial_dir),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_path, verbose=0,
            checkpoint_config=tune.CheckpointConfig(**kept_checkpoints(cfg)),
            failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
            callbacks=[RunProgress(cfg.epochs, cfg.max_failures, progress=cfg.progress,
                                   in_sample=cfg.refit)]),
    )
    result = tuner.fit()[0]
    metrics = result.metrics or {}
    # (no report at all is the caller's "no checkpoint" case: e.g. a --resume checkpoint that
    # already ran every epoch)
    if result.error is None and EPOCH in metrics and not _finished(metrics, cfg):
        raise RunInterrupted(f"interrupted after epoch {int(metrics[EPOCH]) + 1} of {cfg.epochs}",
                             result.checkpoint.path if result.checkpoint is not None else None)
    return result


def _finished(metrics: dict[str, Any], cfg: TrainConfig) -> bool:
    """Whether the last report is the loop's last: the final epoch, or early stopping. Tune
    ends a trial it stopped on Ctrl-C as TERMINATED, like one that returned."""
    if int(metrics[EPOCH]) >= cfg.epochs - 1:
        return True
    return cfg.patience is not None and int(metrics.get("bad_epochs", 0)) >= cfg.patience


def _trial_dir(trial) -> str:
    return TRIAL_DIR
