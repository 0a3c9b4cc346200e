"""Recovering a run: what the console says when Ray Train restores it, and ``--resume DIR``.

Ray Train's ``FailureConfig`` restarts a failed worker group from the latest reported
checkpoint; ``FailureNotice`` makes that visible. ``stage_resume_checkpoint`` hands a
checkpoint folder that exists only on the driver to the workers through Ray's checkpoint
mechanism: it is copied into the run's storage (which every node reaches) and passed as a
``ray.train.Checkpoint``, so workers on other nodes never open the driver's path.
"""

from __future__ import annotations

from typing import Any

import ray.train
from ray.train import UserCallback

from imgpipe import storage
from imgpipe.checkpoint import META_FILE, load_meta
from imgpipe.config import TrainConfig
from imgpipe.constants import EPOCH, METRIC_MODES, val_key
from imgpipe.errors import CheckpointError

RESUME_KEY = "resume_checkpoint"
RESUME_DIR_NAME = "resume-from"


class FailureNotice(UserCallback):
    """Says on the console when workers fail and Ray Train restores the latest checkpoint.

    Runs on the Train controller. Counts failures against ``max_failures`` the way Ray Train's
    default failure policy does (one per failed worker-group poll).
    """

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures
        self.failures = 0
        self.last_epoch: int | None = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if checkpoint is not None and metrics and EPOCH in metrics[0]:
            self.last_epoch = int(metrics[0][EPOCH])

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        self.failures += 1
        ranks = ", ".join(str(r) for r in sorted(worker_exceptions))
        first = next(iter(worker_exceptions.values()))
        reason = (str(first).strip().splitlines() or [type(first).__name__])[0][:200]
        print(failure_line(self.failures, self.max_failures, self.last_epoch, ranks,
                           type(first).__name__, reason), flush=True)


def failure_line(failures: int, max_failures: int, last_epoch: int | None, ranks: str,
                 error_type: str, reason: str) -> str:
    """What the console says about the ``failures``-th failure of a run and what comes next
    (``last_epoch``: 0-based epoch of the latest checkpoint, None before the first)."""
    limit = "unlimited" if max_failures < 0 else str(max_failures)
    if 0 <= max_failures < failures:
        action = "no restarts left (max_failures reached): the run fails"
    elif last_epoch is None:
        action = "restarting the workers from the beginning (no checkpoint yet)"
    else:
        action = (f"restoring the latest checkpoint (epoch {last_epoch + 1}) and "
                  f"continuing from epoch {last_epoch + 2}")
    return (f"worker failure {failures} of {limit} allowed (rank {ranks}: {error_type}: "
            f"{reason}); {action}")


def kept_checkpoints(cfg: TrainConfig) -> dict[str, Any]:
    """``CheckpointConfig`` arguments (Ray Train's and Tune's take the same) for what a run
    keeps: the two best by the val metric, which the run is scored by; a refit holds nothing
    out to score by, so it keeps its latest."""
    if cfg.refit:
        return {"num_to_keep": 1}
    return {"num_to_keep": 2, "checkpoint_score_attribute": val_key(cfg.metric),
            "checkpoint_score_order": METRIC_MODES[cfg.metric]}


def stage_resume_checkpoint(resume: str, storage_path: str, run_name: str) -> ray.train.Checkpoint:
    """Copy a checkpoint folder (local to the driver, or a URI) where all workers can read it.

    Raises:
        CheckpointError: ``resume`` is not a checkpoint folder (no ``meta.json``).
    """
    if storage.is_uri(resume):
        if not storage.exists(storage.join(resume, META_FILE)):
            raise CheckpointError(f"--resume {resume}: not a checkpoint ({META_FILE} missing)")
        fs, path = storage.resolve_fs(resume)
        return ray.train.Checkpoint(path=path, filesystem=fs)
    meta = load_meta(resume)  # raises CheckpointError for a folder that is not a checkpoint
    if EPOCH not in meta:
        raise CheckpointError(f"--resume {resume}: {META_FILE} records no epoch")
    dest = storage.join(storage_path, run_name, RESUME_DIR_NAME)
    storage.upload_dir(resume, dest)
    fs, path = storage.resolve_fs(dest)
    return ray.train.Checkpoint(path=path, filesystem=fs)
