"""Training checkpoints: weights as safetensors, optimizer state weights-only, metadata as JSON.

Layout of a checkpoint directory:
    model.safetensors   unwrapped model weights
    train_state.pt      optimizer (+ AMP scaler) state, loaded with ``weights_only=True``
    meta.json           epoch, config, class names/counts, preprocess, metrics, best so far
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgpipe.errors import CheckpointError

if TYPE_CHECKING:
    import torch

# torch and safetensors are imported where used: the Train controller unpickles callbacks that
# read checkpoint metadata, and a controller that needs no torch starts seconds sooner.

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"


def save_checkpoint(directory: str | Path, model: torch.nn.Module | Mapping[str, torch.Tensor],
                    meta: dict[str, Any], optimizer: torch.optim.Optimizer | None = None,
                    scaler: torch.amp.GradScaler | None = None,
                    extra_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint of an already unwrapped ``model`` (or its state dict, e.g. with LoRA
    merged) into ``directory``; ``extra_state`` joins the optimizer's in ``train_state.pt``
    (tensors, numbers: what ``weights_only`` loading accepts)."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = model if isinstance(model, Mapping) else model.state_dict()
    # safetensors refuses shared/non-contiguous storage; clone to plain CPU tensors.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    if optimizer is not None:
        train_state = {"optimizer": optimizer.state_dict()}
        if scaler is not None:
            train_state["scaler"] = scaler.state_dict()
        train_state.update(extra_state or {})
        torch.save(train_state, directory / STATE_FILE)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
    return directory


def load_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"not a checkpoint: {path} is missing")
    return json.loads(path.read_text())


def load_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"not a checkpoint: {path} is missing")
    from safetensors.torch import load_file

    return load_file(str(path))


def load_train_state(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)
