"""Optimizer steps per epoch: the same count on every DDP rank, and enough of them on small data.

Two things go wrong with "one pass over the shard" epochs:

* **Step parity.** Ray Data's ``iter_torch_batches`` can yield short batches mid-stream (block
  boundaries with a local shuffle buffer), and resampling draws a random number of rows per
  rank, so two ranks can run 6 and 7 steps in one epoch. DDP's gradient all-reduce then waits
  on the rank that stopped: a hang. ``exact_batches`` re-cuts any stream into exactly ``steps``
  batches of exactly ``batch_size`` rows on every rank, whatever the batch size, shuffle buffer
  or sampler, without any extra collective.
* **Under-training.** 254 images at batch 64 on 2 ranks is 2 steps per epoch; 30 epochs are 60
  steps. ``plan_epoch_steps`` guarantees ``min_steps`` per epoch by asking the stream for more
  resampled (freshly augmented) copies of every row, so the schedule is over optimizer steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class EpochSteps:
    """``steps`` optimizer steps per rank per epoch; the stream repeats each row ``repeat``×
    (on top of the class resampling rate) so that the steps are fed by fresh rows."""

    steps: int
    repeat: int
    natural_steps: int  # what one resampled pass would give

    def summary(self) -> str:
        extra = f" ({self.repeat} augmented passes per epoch)" if self.repeat > 1 else ""
        return f"{self.steps} optimizer steps per epoch per worker{extra}"


def plan_epoch_steps(epoch_rows: float, world_size: int, batch_size: int,
                     min_steps: int) -> EpochSteps:
    """Steps per epoch = max(floor(rows / (world · batch)), ``min_steps``).

    Args:
        epoch_rows: expected rows of one resampled pass over the train split (all ranks).
        world_size: DDP ranks; batch_size: rows per rank per step; min_steps: floor (≥ 1).

    Raises:
        ValueError: when the epoch has fewer rows than ranks (a rank would get no data).
    """
    if epoch_rows < world_size:
        raise ValueError(f"num_workers: {world_size} ranks but an epoch has only "
                         f"{epoch_rows:.0f} rows; use fewer workers")
    natural = max(1, math.floor(epoch_rows / (world_size * batch_size)))
    steps = max(natural, int(min_steps))
    repeat = max(1, math.ceil(steps * world_size * batch_size / epoch_rows))
    return EpochSteps(steps=steps, repeat=repeat, natural_steps=natural)


def _rows(batch: dict[str, torch.Tensor]) -> int:
    return len(next(iter(batch.values())))


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    import torch

    if len(parts) == 1:
        return parts[0]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def exact_batches(batches: Iterable[dict[str, torch.Tensor]], steps: int, batch_size: int,
                  seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Yield exactly ``steps`` batches of exactly ``batch_size`` rows from any batch stream.

    Rows are taken in stream order. Rows left after the last step are consumed and dropped
    (the stream must be drained: a streaming split expects every rank to take its share). If
    the stream runs short — a resampled epoch drew a few rows fewer on this rank — the missing
    rows are redrawn (seeded by ``seed``) from the rows seen last, so the count never depends
    on the data. Raises ValueError if the stream yields no rows at all.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    it = iter(batches)
    pending: list[dict[str, torch.Tensor]] = []
    held, produced = 0, 0
    last: dict[str, torch.Tensor] | None = None
    for batch in it:
        if _rows(batch) == 0:
            continue
        pending.append(batch)
        held += _rows(batch)
        while held >= batch_size and produced < steps:
            merged = _cat(pending)
            last = {k: v[:batch_size] for k, v in merged.items()}
            rest = {k: v[batch_size:] for k, v in merged.items()}
            pending, held = ([rest], held - batch_size) if held > batch_size else ([], 0)
            produced += 1
            yield last
        if produced == steps:
            break
    for _ in it:  # drain what this rank was handed
        pass
    if produced == steps:
        return
    seen = ([last] if last is not None else []) + [p for p in pending if _rows(p)]
    if not seen:
        raise ValueError("the training stream yielded no rows on this rank")
    pool = _cat(seen)
    import torch  # here: the step plan is made where torch is not imported (a trial's actor)

    gen = torch.Generator().manual_seed(seed)
    while produced < steps:
        idx = torch.randint(0, _rows(pool), (batch_size,), generator=gen)
        produced += 1
        yield {k: v[idx] for k, v in pool.items()}
