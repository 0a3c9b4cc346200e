"""The run's final numbers: the kept checkpoint scored on held-out splits, in a Ray task.

Scoring needs torch and the model code. The train job's driver imports neither otherwise, and
importing them there cost about 5 s at the end of every run on a 2-core laptop
(``benchmarks/train_bench.py``). The task is given the runtime env of the process that
trained (Ray Train's workers, or a one-worker run's Tune trial actor), so it lands
in an idle process of the run's own Ray Data tasks, where the stream's map tasks have already
imported torch (Ray keeps idle workers for ``RAY_idle_worker_killing_time_threshold_ms``). On a
cluster it runs on any node, which reads the data and the run's storage like the workers do.

This module imports no torch: a worker unpickles ``score_checkpoint`` by importing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray

from imgpipe.runtime import train_worker_runtime_env

TASK_NAME = "score_checkpoint"


def score_checkpoint(checkpoint: ray.train.Checkpoint, data_root: str,
                     splits: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``evaluate_checkpoint`` of ``checkpoint`` on each of ``splits`` → {split: metrics}, with
    the model loaded once, read in place when the checkpoint is local (``as_directory``).

    Runs where it is called; :func:`score_checkpoint_remotely` runs it as a Ray task.
    """
    from imgpipe.evaluate import load_checkpoint_model, score_split  # torch: the task's only

    with checkpoint.as_directory() as d:
        model, pre, meta = load_checkpoint_model(d)
    return {split: score_split(model, pre, data_root, split, len(meta["class_names"]))
            for split in splits}


def score_checkpoint_remotely(checkpoint: ray.train.Checkpoint, data_root: str,
                              splits: Sequence[str], runtime_env: dict | None = None
                              ) -> dict[str, dict[str, Any]]:
    """:func:`score_checkpoint` as a one-CPU Ray task named ``score_checkpoint``, in
    ``runtime_env`` (default: the Ray Train workers' one, see
    :func:`~imgpipe.runtime.train_worker_runtime_env`); blocks until it returns.

    Raises:
        The task's own error (e.g. ``ManifestError`` for a split file that is gone), chained
        to Ray's ``RayTaskError``, which holds the remote traceback: a user error then reads as
        the one line it would be in the driver, not as Ray's wrapper text.
    """
    env = train_worker_runtime_env() if runtime_env is None else runtime_env
    task = ray.remote(score_checkpoint).options(name=TASK_NAME, runtime_env=env or None)
    try:
        return ray.get(task.remote(checkpoint, data_root, tuple(splits)))
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, Exception):
            raise e.cause from e
        raise
