"""The training loop: in Ray Train workers (DDP over gloo or NCCL), or in a one-worker Tune
trial's own actor (``training.session``)."""

from __future__ import annotations

import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F

from imgpipe.checkpoint import load_meta, load_train_state, load_weights, save_checkpoint
from imgpipe.config import TrainConfig
from imgpipe.constants import (
    EPOCH,
    LABEL,
    LOCAL_STREAM,
    PIXELS,
    TRAIN,
    TRAIN_LOSS,
    VAL,
    VAL_LOSS,
    val_key,
)
from imgpipe.data.pipeline import build_train_stream, set_epoch
from imgpipe.data.transforms import Preprocess, normalize
from imgpipe.losses import create_loss
from imgpipe.metrics import classification_metrics, confusion_matrix
from imgpipe.models import create_model, load_init_checkpoint, unwrap_model
from imgpipe.models.finetune import apply_finetune, export_state_dict
from imgpipe.training.ema import WeightEma
from imgpipe.training.mixing import create_batch_mixer
from imgpipe.training.optim import create_optimizer, lr_factor, set_lr
from imgpipe.training.recovery import RESUME_KEY
from imgpipe.training.session import TrainSession, TrialSession
from imgpipe.training.steps import exact_batches

# train_state.pt keys of a checkpoint whose weights are the average (``optim.ema_decay``)
RAW_WEIGHTS, EMA_UPDATES = "raw_weights", "ema_updates"


def local_train_stream(local: dict[str, Any], epoch: int) -> ray.data.Dataset:
    """This epoch's train stream of a one-rank run (``LOCAL_STREAM``), built on the worker.

    It gets the ingest options Train gives the datasets it manages
    (``DataConfig.default_ingest_options``, from the DataContext Train propagated when the run
    started: ``preserve_order`` for ``deterministic``, resource limits). A dataset otherwise
    keeps the context it was created with, and a search decodes its splits on the driver
    before any trial sets its own.
    """
    decoded = local["decoded"]
    decoded.context.execution_options = ray.train.DataConfig.default_ingest_options()
    return build_train_stream(decoded, replace(local["plan"], epoch=epoch))


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
                    pre: Preprocess, epoch: int, steps: int, device,
                    mixer=None, ema: WeightEma | None = None) -> tuple[float, int]:
    """One epoch of ``steps`` optimizer steps (``loader`` yields exactly that many batches on
    every rank, see ``steps.exact_batches``); returns (mean loss over all ranks, rows seen by
    all). The lr follows warm-up + cosine over optimizer steps (``epoch + i / steps``).

    ``mixer`` (``training.mixing.create_batch_mixer``) turns the batch into MixUp/CutMix
    images with soft targets; the loss takes either form. ``ema`` (``training.ema``) is
    updated after every optimizer step.
    """
    model.train()
    loss_sum, rows = 0.0, 0
    amp = torch.autocast("cuda", dtype=torch.float16) if cfg.amp else nullcontext()
    for i, batch in enumerate(loader):
        set_lr(optimizer, cfg.optim.lr, lr_factor(epoch + min(i / steps, 1.0), cfg.epochs,
                                                   cfg.optim))
        x = normalize(batch[PIXELS].to(device, non_blocking=True), pre)
        y = batch[LABEL].to(device, non_blocking=True)
        target = y
        if mixer is not None:
            x, target = mixer(x, y)
        with amp:
            loss = loss_fn(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.optim.grad_clip:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(model)
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


def _resume_checkpoint(config: dict[str, Any], session: TrainSession | TrialSession):
    """(checkpoint, restored): the latest checkpoint of a restored run or retried trial, else
    the ``--resume`` one (a ``ray.train.Checkpoint`` staged in the run's storage by
    ``recovery.stage_resume_checkpoint``, never a driver-local path), else None."""
    ckpt = session.get_checkpoint()
    restored = ckpt is not None
    return (ckpt if restored else config.get(RESUME_KEY)), restored


def plain_model(cfg: TrainConfig, num_classes: int, pre: Preprocess) -> torch.nn.Module:
    """The run's architecture, freshly initialised, without fine-tuning adapters."""
    return create_model(cfg.model.name, num_classes, in_channels=pre.channels,
                        cifar_stem=cfg.model.cifar_stem, image_size=pre.image_size)


def create_train_model(cfg: TrainConfig, num_classes: int, pre: Preprocess,
                       init_weights: Any, resume) -> torch.nn.Module:
    """Build the model: starting weights (an object ref from the driver), then the resumed
    checkpoint's weights (checkpoints hold the plain architecture, LoRA merged), then the
    fine-tuning mode (freezing, adapters)."""
    model = plain_model(cfg, num_classes, pre)
    if init_weights is not None:
        load_init_checkpoint(model, ray.get(init_weights))
    if resume is not None:
        with resume.as_directory() as d:
            # with weight averaging the checkpoint's weights are the average; training goes on
            # from the raw ones
            state = load_train_state(d) or {}
            model.load_state_dict(state.get(RAW_WEIGHTS) or load_weights(d))
    return apply_finetune(model, cfg.model.finetune, cfg.model.lora_rank, cfg.model.lora_alpha)


def _restore(resume, restored: bool, optimizer, scaler, ema: WeightEma | None
             ) -> tuple[int, float | None, int, list, list]:
    """Optimizer/scaler state, the weight average and counters of the checkpoint the weights
    came from.

    Returns (start epoch, best score, bad epochs, history, restarts); ``restarts`` gains an
    entry per restore.
    """
    if resume is None:
        return 0, None, 0, [], []
    with resume.as_directory() as d:
        state = load_train_state(d)
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            if "scaler" in state:
                scaler.load_state_dict(state["scaler"])
            if ema is not None and EMA_UPDATES in state:  # else the average starts afresh
                ema.state, ema.updates = load_weights(d), int(state[EMA_UPDATES])
        meta = load_meta(d)
    start = int(meta[EPOCH]) + 1
    restarts = list(meta.get("restarts", []))
    if restored:
        restarts.append({"resumed_at_epoch": start})
    return (start, meta.get("best"), int(meta.get("bad_epochs", 0)),
            list(meta.get("history", [])), restarts)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` is ``RunInputs.loop_config`` (``trainer``)."""
    train_loop(config, TrainSession())


def train_loop(config: dict[str, Any], session: TrainSession | TrialSession) -> None:
    """Train for ``config["train"]["epochs"]`` epochs on ``session``'s host, reporting each
    epoch's val metrics (and rank 0's checkpoint) through it."""
    cfg = TrainConfig.model_validate(config["train"])
    pre = Preprocess.model_validate(config["preprocess"])
    class_names: list[str] = config["class_names"]
    counts: list[int] = config["train_counts"]
    rank = session.rank
    torch.manual_seed(cfg.seed + rank)
    device = session.device(cfg.use_gpu)

    resume, restored = _resume_checkpoint(config, session)
    model = create_train_model(cfg, len(class_names), pre, config.get("init_weights"), resume)
    # DDP (world > 1) broadcasts rank 0's initial weights, so all ranks start identical; it
    # only reduces gradients of trainable parameters, so frozen ones need no special case.
    model = session.prepare_model(model, device)
    loss_fn = create_loss(cfg.loss, counts).to(device)
    pool = config.get("partner_pool")
    mixer = create_batch_mixer(cfg.mix, len(class_names), cfg.seed, rank, pre, cfg.augment,
                               ray.get(pool) if pool is not None else None)
    optimizer = create_optimizer(cfg.optim, model)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp)
    # rank 0 alone evaluates and checkpoints, so it alone keeps the average
    ema = WeightEma(cfg.optim.ema_decay) if cfg.optim.ema_decay and rank == 0 else None
    start, best, bad_epochs, history, restarts = _restore(resume, restored, optimizer, scaler,
                                                          ema)
    if ema is not None:
        ema.to(device)
        # the plain architecture the average is evaluated in (no DDP, adapters or freezing)
        ema_model = plain_model(cfg, len(class_names), pre).to(device)
    config = {**config, "restarts": restarts}

    steps = int(config["epoch_steps"])
    key, mode = val_key(cfg.metric), "max"
    local = config.get(LOCAL_STREAM)
    train_shard = session.dataset(TRAIN) if local is None else None
    val_shard = session.dataset(VAL) if rank == 0 else None

    last_end = time.perf_counter()
    for epoch in range(start, cfg.epochs):
        if local is None:
            set_epoch(config["clock_name"], epoch)
            source = train_shard
        else:
            source = local_train_stream(local, epoch)
        loss_fn.set_epoch(epoch)
        if mixer is not None:
            mixer.set_epoch(epoch)
        stream = source.iter_torch_batches(
            batch_size=cfg.batch_size, local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=(cfg.seed * 1000 + epoch) if cfg.shuffle_buffer else None,
            dtypes={PIXELS: torch.uint8, LABEL: torch.int64})
        # Same step count on every rank, whatever the stream's batch boundaries.
        loader = exact_batches(stream, steps, cfg.batch_size,
                               seed=(cfg.seed * 1_000_003 + epoch) * 97 + rank)
        train_loss, rows = train_one_epoch(model, loader, loss_fn, optimizer, scaler, cfg, pre,
                                           epoch, steps, device, mixer, ema)
        metrics: dict[str, Any] | None = None
        if rank == 0:
            scored = ema.load_into(ema_model) if ema is not None else unwrap_model(model)
            val = evaluate(scored, val_shard.iter_torch_batches(
                batch_size=256, dtypes={PIXELS: torch.uint8, LABEL: torch.int64}),
                pre, len(class_names), device)
            metrics = {val_key(k) if k != VAL_LOSS else k: v for k, v in val.items()}
            metrics.update({EPOCH: epoch, TRAIN_LOSS: train_loss, "train_rows": rows,
                            "train_steps": steps, "lr": optimizer.param_groups[0]["lr"],
                            # wall time of one epoch cycle: train, val, previous report
                            "epoch_s": time.perf_counter() - last_end})
            last_end = time.perf_counter()
        metrics = _broadcast(metrics)
        improved = best is None or (metrics[key] > best if mode == "max" else metrics[key] < best)
        best = metrics[key] if improved else best
        bad_epochs = 0 if improved else bad_epochs + 1
        metrics.update({"best": best, "is_best": improved, "bad_epochs": bad_epochs})
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        _report(session, metrics, history, model, optimizer, scaler, config, ema)
        if cfg.patience is not None and bad_epochs >= cfg.patience:
            break


def _report(session: TrainSession | TrialSession, metrics: dict[str, Any],
            history: list[dict[str, Any]], model, optimizer, scaler,
            config: dict[str, Any], ema: WeightEma | None = None) -> None:
    if session.rank != 0:
        session.report(metrics)  # every rank reports the same number of times
        return
    with tempfile.TemporaryDirectory() as tmp:
        meta = {**{k: config[k] for k in ("train", "class_names", "train_counts", "preprocess",
                                          "restarts")},
                **metrics, "history": history}
        if ema is None:
            save_checkpoint(tmp, export_state_dict(model), meta, optimizer, scaler)
        else:  # the average is the checkpoint's model; the raw weights continue a resume
            save_checkpoint(tmp, ema.state, meta, optimizer, scaler, extra_state={
                RAW_WEIGHTS: export_state_dict(model), EMA_UPDATES: ema.updates})
        session.report(metrics, checkpoint_dir=tmp)
