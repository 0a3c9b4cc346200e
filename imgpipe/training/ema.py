"""An exponential moving average (EMA) of the weights, evaluated and kept instead of the raw ones.

On small data the raw weights of the last steps are noisy (a step sees a few freshly resampled
and augmented rare images); their running average generalises better and makes the val-picked
epoch less of a lottery (Polyak & Juditsky 1992; timm's ``ModelEmaV3``, whose warm-up this
follows: the decay at update ``t`` is ``min(decay, (1 + t) / (10 + t))``, so early averages do
not hold on to the random initial weights).

The average is kept of the *exported* state dict (``finetune.export_state_dict``: the plain
architecture, LoRA deltas merged), so it loads into ``create_model`` like any checkpoint and is
the same for a frozen, adapted or DDP-wrapped model. Buffers are averaged too (BatchNorm running
statistics, as timm does); integer buffers (``num_batches_tracked``) are copied. torch's
``swa_utils.AveragedModel`` averages a module instead (for a LoRA model, one with adapters,
which ``create_model`` cannot load) and its EMA function has no warm-up.
"""

from __future__ import annotations

import torch

from imgpipe.models.finetune import export_state_dict


class WeightEma:
    """Running average of ``export_state_dict(model)``, updated after every optimizer step.

    Args:
        decay: the long-run decay per update, in (0, 1) (e.g. 0.99: a horizon of ~100 steps).
        state: a saved average to continue (a checkpoint's weights), with ``updates`` done.
    """

    def __init__(self, decay: float, state: dict[str, torch.Tensor] | None = None,
                 updates: int = 0) -> None:
        self.decay = decay
        self.state = state
        self.updates = updates

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        current = export_state_dict(model)
        if self.state is None:
            self.state = {k: v.detach().clone() for k, v in current.items()}
        else:
            weight = 1.0 - self.current_decay()
            for k, avg in self.state.items():
                new = current[k].detach().to(avg.device)
                if avg.is_floating_point():
                    avg.lerp_(new.to(avg.dtype), weight)
                else:
                    avg.copy_(new)
        self.updates += 1

    def to(self, device: torch.device) -> WeightEma:
        if self.state is not None:
            self.state = {k: v.to(device) for k, v in self.state.items()}
        return self

    def load_into(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` (the plain architecture) holding the average; returned for chaining."""
        model.load_state_dict(self.state)
        return model
