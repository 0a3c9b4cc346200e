"""Where the training loop runs: a Ray Train worker, or a Tune trial's own actor.

The loop (``training.loop``) needs five things from its host: its rank and device, the model
prepared for that device (DDP-wrapped under Ray Train with several workers), the checkpoint to
resume from, its datasets, and a way to report each epoch's metrics and checkpoint.

* ``TrainSession``: inside a Ray Train worker (the train job, the refit, a multi-worker trial).
* ``TrialSession``: inside a Tune trial's function actor, for a one-worker trial. Ray Train would
  start a controller, a worker, a placement-group cleaner, a synchronization actor and a dataset
  manager for every trial (seven actor processes per trial with Tune's own, measured with
  ``benchmarks/actor_startup.py``); a one-worker trial needs none of them, and with Tune's
  ``reuse_actors`` the trial actor that imported torch for one trial runs the next one too.
  Failure recovery is Tune's: a retried trial resumes from its latest reported checkpoint
  (``ray.tune.get_checkpoint``), as Ray Train's worker-group restart would.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
import torch


class TrainSession:
    """The loop's host is a Ray Train worker (``ray.train`` APIs)."""

    def __init__(self) -> None:
        import ray.train

        self._train = ray.train
        # Train V2 logs every report (the whole metrics dict, per rank) at INFO on a logger
        # named by its file path, outside the "ray.train" hierarchy that LoggingConfig controls.
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)

    @property
    def rank(self) -> int:
        return self._train.get_context().get_world_rank()

    def device(self, use_gpu: bool) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        import ray.train.torch

        # moves it to ``device``; several ranks get it wrapped in DDP, which broadcasts rank
        # 0's initial weights
        return ray.train.torch.prepare_model(model)

    def get_checkpoint(self):
        return self._train.get_checkpoint()

    def dataset(self, name: str):
        return self._train.get_dataset_shard(name)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        ckpt = (self._train.Checkpoint.from_directory(checkpoint_dir)
                if checkpoint_dir is not None else None)
        self._train.report(metrics, checkpoint=ckpt)


class TrialSession:
    """The loop's host is a Tune trial's function actor: one rank, ``ray.tune`` reporting.

    Args:
        datasets: the run's datasets by split (``RunInputs.datasets``), read directly.
    """

    def __init__(self, datasets: dict[str, ray.data.Dataset]) -> None:
        self._datasets = datasets

    rank = 0

    def device(self, use_gpu: bool) -> torch.device:
        # Ray sets CUDA_VISIBLE_DEVICES to the GPU the trial was given: it is device 0.
        return torch.device("cuda", 0) if use_gpu else torch.device("cpu")

    def prepare_model(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        return model.to(device)

    def get_checkpoint(self):
        from ray import tune

        return tune.get_checkpoint()

    def dataset(self, name: str):
        return self._datasets[name]

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        from ray import tune

        ckpt = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=ckpt)
