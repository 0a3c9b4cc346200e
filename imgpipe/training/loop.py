"""The per-worker training loop (runs inside Ray Train workers; DDP over gloo or NCCL)."""

from __future__ import annotations

import logging
import math
import tempfile
from contextlib import nullcontext
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from imgpipe.config import TrainConfig
from imgpipe.constants import EPOCH, LABEL, PIXELS, TRAIN, TRAIN_LOSS, VAL, VAL_LOSS, val_key
from imgpipe.data.pipeline import set_epoch
from imgpipe.data.transforms import Preprocess, normalize
from imgpipe.losses import create_loss
from imgpipe.metrics import classification_metrics, confusion_matrix
from imgpipe.models import create_model, unwrap_model
from imgpipe.training.checkpoint import load_meta, load_train_state, load_weights, save_checkpoint
from imgpipe.training.optim import create_optimizer, lr_factor, set_lr
from imgpipe.training.recovery import RESUME_KEY


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _distributed():
        dist.all_reduce(t)
    return t.tolist()


def _broadcast(obj: Any) -> Any:
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train_one_epoch(model, loader, loss_fn, optimizer, scaler, cfg: TrainConfig,
                    pre: Preprocess, epoch: int, steps_est: int, device) -> tuple[float, int]:
    """One pass over this rank's shard; returns (mean loss over all ranks, rows seen by all)."""
    model.train()
    loss_sum, rows = 0.0, 0
    amp = torch.autocast("cuda", dtype=torch.float16) if cfg.amp else nullcontext()
    for i, batch in enumerate(loader):
        set_lr(optimizer, cfg.optim.lr, lr_factor(epoch + min(i / steps_est, 1.0), cfg.epochs,
                                                   cfg.optim))
        x = normalize(batch[PIXELS].to(device, non_blocking=True), pre)
        y = batch[LABEL].to(device, non_blocking=True)
        with amp:
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.optim.grad_clip:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        loss_sum += float(loss.detach()) * len(y)
        rows += len(y)
    loss_sum, rows = _all_sum([loss_sum, float(rows)], device)
    return loss_sum / max(rows, 1), int(rows)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, pre: Preprocess, num_classes: int,
             device) -> dict[str, Any]:
    """Exact metrics over the whole split: summed confusion matrix and unweighted CE."""
    model.eval()
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    loss_sum, rows = 0.0, 0
    for batch in loader:
        x = normalize(batch[PIXELS].to(device), pre)
        y = batch[LABEL].to(device)
        logits = model(x).float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        rows += len(y)
        cm += confusion_matrix(y.cpu().numpy(), logits.argmax(1).cpu().numpy(), num_classes)
    out = classification_metrics(cm)
    out[VAL_LOSS] = loss_sum / max(rows, 1)
    out["num_rows"] = rows
    return out


def _restore(config: dict[str, Any], model, optimizer, scaler
             ) -> tuple[int, float | None, int, list, list]:
    """Resume from Ray Train's latest checkpoint (a restored run) or the ``--resume`` one.

    The ``--resume`` folder arrives as a ``ray.train.Checkpoint`` in the run's storage
    (``recovery.stage_resume_checkpoint``), never as a driver-local path. Returns (start epoch,
    best score, bad epochs, history, restarts); ``restarts`` gains an entry per restore.
    """
    ckpt = ray.train.get_checkpoint()
    restored = ckpt is not None
    ckpt = ckpt if restored else config.get(RESUME_KEY)
    if ckpt is None:
        return 0, None, 0, [], []
    with ckpt.as_directory() as d:
        unwrap_model(model).load_state_dict(load_weights(d))
        state = load_train_state(d)
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            if "scaler" in state:
                scaler.load_state_dict(state["scaler"])
        meta = load_meta(d)
    start = int(meta[EPOCH]) + 1
    restarts = list(meta.get("restarts", []))
    if restored:
        restarts.append({"resumed_at_epoch": start})
    return (start, meta.get("best"), int(meta.get("bad_epochs", 0)),
            list(meta.get("history", [])), restarts)


def _quiet_report_log() -> None:
    # Train V2 logs every report (the whole metrics dict, per rank) at INFO on a logger named
    # by its file path, outside the "ray.train" hierarchy that LoggingConfig controls.
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` is built by ``trainer.build_loop_config``."""
    cfg = TrainConfig.model_validate(config["train"])
    _quiet_report_log()
    pre = Preprocess.model_validate(config["preprocess"])
    class_names: list[str] = config["class_names"]
    counts: list[int] = config["train_counts"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()

    model = create_model(cfg.model.name, len(class_names), in_channels=pre.channels,
                         cifar_stem=cfg.model.cifar_stem, init_checkpoint=cfg.model.init_checkpoint)
    # DDP (world > 1) broadcasts rank 0's initial weights, so all ranks start identical.
    model = ray.train.torch.prepare_model(model)
    loss_fn = create_loss(cfg.loss, counts).to(device)
    optimizer = create_optimizer(cfg.optim, model.parameters())
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp)
    start, best, bad_epochs, history, restarts = _restore(config, model, optimizer, scaler)
    config = {**config, "restarts": restarts}

    steps_est = max(1, math.ceil(config["epoch_rows"] / world / cfg.batch_size))
    key, mode = val_key(cfg.metric), "max"
    train_shard = ray.train.get_dataset_shard(TRAIN)
    val_shard = ray.train.get_dataset_shard(VAL) if rank == 0 else None

    for epoch in range(start, cfg.epochs):
        set_epoch(config["clock_name"], epoch)
        loss_fn.set_epoch(epoch)
        loader = train_shard.iter_torch_batches(
            batch_size=cfg.batch_size, local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=(cfg.seed * 1000 + epoch) if cfg.shuffle_buffer else None,
            dtypes={PIXELS: torch.uint8, LABEL: torch.int64})
        train_loss, rows = train_one_epoch(model, loader, loss_fn, optimizer, scaler, cfg, pre,
                                           epoch, steps_est, device)
        metrics: dict[str, Any] | None = None
        if rank == 0:
            val = evaluate(unwrap_model(model), val_shard.iter_torch_batches(
                batch_size=256, dtypes={PIXELS: torch.uint8, LABEL: torch.int64}),
                pre, len(class_names), device)
            metrics = {val_key(k) if k != VAL_LOSS else k: v for k, v in val.items()}
            metrics.update({EPOCH: epoch, TRAIN_LOSS: train_loss, "train_rows": rows,
                            "lr": optimizer.param_groups[0]["lr"]})
        metrics = _broadcast(metrics)
        improved = best is None or (metrics[key] > best if mode == "max" else metrics[key] < best)
        best = metrics[key] if improved else best
        bad_epochs = 0 if improved else bad_epochs + 1
        metrics.update({"best": best, "is_best": improved, "bad_epochs": bad_epochs})
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        _report(metrics, history, model, optimizer, scaler, config, rank)
        if cfg.patience is not None and bad_epochs >= cfg.patience:
            break


def _report(metrics: dict[str, Any], history: list[dict[str, Any]], model, optimizer, scaler,
            config: dict[str, Any], rank: int) -> None:
    if rank != 0:
        ray.train.report(metrics)  # every rank reports the same number of times
        return
    with tempfile.TemporaryDirectory() as tmp:
        meta = {**{k: config[k] for k in ("train", "class_names", "train_counts", "preprocess",
                                          "restarts")},
                **metrics, "history": history}
        save_checkpoint(tmp, unwrap_model(model), meta, optimizer, scaler)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
