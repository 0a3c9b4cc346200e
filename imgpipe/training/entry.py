"""The function every Ray Train worker runs, importable without torch.

The process that builds a run hands this function to Ray Train, which pickles it by reference.
In a Tune search that process is the trial's actor, started afresh for every trial: importing
the training loop there (torch, scikit-learn) cost seconds of each trial's start-up on a laptop,
for a function it never calls. The loop is imported on the worker, where it runs.
"""

from __future__ import annotations

from typing import Any


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``imgpipe.training.loop.train_loop_per_worker`` on the worker."""
    from imgpipe.training.loop import train_loop_per_worker as loop

    loop(config)
