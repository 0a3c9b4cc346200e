"""The plain-PyTorch baselines the benchmarks compare against (no Ray anywhere).

Same shards, same decode, same per-class resampling rates, same augmentation, same model,
optimizer and lr schedule as imgpipe; everything held in memory in one process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imgpipe.config import TrainConfig
from imgpipe.constants import ID, IMAGE, LABEL, TRAIN, VAL
from imgpipe.data.augment import augment_batch
from imgpipe.data.manifest import load_manifest
from imgpipe.data.rebalance import id_hashes, repeat_counts, sampling_rates
from imgpipe.data.shards import read_split_table
from imgpipe.data.transforms import Preprocess, decode_image, normalize
from imgpipe.losses import create_loss
from imgpipe.metrics import classification_metrics, confusion_matrix
from imgpipe.models import create_model
from imgpipe.training.optim import create_optimizer, lr_factor, set_lr
from imgpipe.training.steps import plan_epoch_steps

DEFAULT_DATA = "data/digits-lt"


def bench_data(path: str) -> str:
    """A benchmark's ``--data`` folder, absolute. Prepared shards are used as they are;
    digits-lt is prepared only into the default folder, and only when it holds none: never
    over a user's data, never into a mistyped path.

    Raises:
        SystemExit: ``path`` holds no prepared shards and is not the default folder.
    """
    from imgpipe.config import PrepareConfig
    from imgpipe.data.manifest import ManifestNotFoundError
    from imgpipe.data.prepare import ensure_prepared

    try:
        load_manifest(path)
    except ManifestNotFoundError:
        if Path(path).resolve() != Path(DEFAULT_DATA).resolve():
            raise SystemExit(f"--data {path}: no prepared shards there (no manifest.json). "
                             "Prepare your images with jobs/prepare_data.py, or leave --data "
                             f"at {DEFAULT_DATA} (digits-lt, prepared on first use)") from None
        ensure_prepared(PrepareConfig(dataset="digits-lt", out=path))
    return str(Path(path).resolve())


@dataclass
class InMemorySplit:
    pixels: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    hashes: np.ndarray  # uint64 (N,), row-id hashes (the stream's resampling key)


def load_split(root: str, split: str, pre: Preprocess) -> InMemorySplit:
    """Decode a whole split into memory (corrupt images skipped)."""
    table = read_split_table(root, split).to_pydict()
    pixels, labels, ids = [], [], []
    for data, label, rid in zip(table[IMAGE], table[LABEL], table[ID], strict=True):
        try:
            pixels.append(decode_image(bytes(data), pre))
        except ValueError:
            continue
        labels.append(int(label))
        ids.append(str(rid))
    return InMemorySplit(np.stack(pixels), np.asarray(labels, dtype=np.int64), id_hashes(ids))


@torch.no_grad()
def score(model: torch.nn.Module, split: InMemorySplit, pre: Preprocess,
          num_classes: int) -> dict:
    model.eval()
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for i in range(0, len(split.labels), 256):
        x = normalize(torch.from_numpy(split.pixels[i:i + 256]), pre)
        pred = model(x).argmax(1).numpy()
        cm += confusion_matrix(split.labels[i:i + 256], pred, num_classes)
    return classification_metrics(cm)


def iter_plain_epochs(cfg: TrainConfig, world_size: int = 1,
                      score_splits: tuple[str, ...] = (VAL,), threads: int = 1,
                      train_splits: tuple[str, ...] = (TRAIN,)):
    """Train like imgpipe's loop with ``world_size × batch_size`` rows per step, in one process;
    yields ``{epoch, seconds, steps, scores: {split: metrics}}`` after every epoch (seconds:
    training and scoring, decode excluded). ``train_splits``: the splits trained on together
    (their class counts drive the resampling rates and the loss's priors)."""
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    manifest = load_manifest(cfg.data)
    pre = manifest.preprocess(cfg.model.image_size)
    parts = [load_split(cfg.data, s, pre) for s in train_splits]
    train = InMemorySplit(*(np.concatenate([getattr(p, f) for p in parts])
                            for f in ("pixels", "labels", "hashes")))
    held = {s: load_split(cfg.data, s, pre) for s in score_splits}
    counts = [sum(manifest.counts_vector(s)[i] for s in train_splits)
              for i in range(len(manifest.class_names))]
    rates = sampling_rates(counts, cfg.sampler.strategy)
    k = len(counts)
    steps = plan_epoch_steps(float((counts * rates).sum()), world_size, cfg.batch_size,
                             cfg.min_steps_per_epoch)
    batch = cfg.batch_size * world_size
    model = create_model(cfg.model.name, k, in_channels=pre.channels,
                         cifar_stem=cfg.model.cifar_stem)
    opt = create_optimizer(cfg.optim, model.parameters())
    loss_fn = create_loss(cfg.loss, counts)
    gen = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(cfg.epochs):
        t = time.perf_counter()
        copies = repeat_counts(train.labels, train.hashes, rates * steps.repeat, cfg.seed, epoch)
        idx = np.repeat(np.arange(len(copies)), copies)
        idx = idx[torch.randperm(len(idx), generator=gen).numpy()]
        model.train()
        loss_fn.set_epoch(epoch)
        for i in range(steps.steps):
            rows = idx[(i * batch) % max(len(idx), 1):][:batch]
            if len(rows) < batch:
                rows = np.concatenate([rows, idx[:batch - len(rows)]])
            set_lr(opt, cfg.optim.lr, lr_factor(epoch + i / steps.steps, cfg.epochs, cfg.optim))
            px = augment_batch(train.pixels[rows], cfg.augment, pre, gen)
            x = normalize(torch.from_numpy(px), pre)
            loss = loss_fn(model(x), torch.from_numpy(train.labels[rows]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
        scores = {s: score(model, held[s], pre, k) for s in score_splits}
        yield {"epoch": epoch, "seconds": time.perf_counter() - t, "steps": steps.steps,
               "scores": scores}


def plain_train(cfg: TrainConfig, world_size: int = 1, score_splits: tuple[str, ...] = (VAL,),
                threads: int = 1, train_splits: tuple[str, ...] = (TRAIN,)) -> dict:
    """Run ``iter_plain_epochs`` to the end. Returns per-epoch seconds (train + scoring),
    the steps per epoch, and the scores of the epoch with the best val ``cfg.metric`` (the
    held-out protocol of the train job: pick by the first split, report all)."""
    epochs, best, best_scores, steps = [], None, {}, 0
    for e in iter_plain_epochs(cfg, world_size, score_splits, threads, train_splits):
        epochs.append(e["seconds"])
        steps = e["steps"]
        val = e["scores"][score_splits[0]][cfg.metric]
        if best is None or val > best:
            best, best_scores = val, e["scores"]
    return {"epoch_s": epochs, "steps_per_epoch": steps, "best_val": best,
            "scores": best_scores}
