"""Ray Train set-up: data plan, resource plan, run config; ``run_training`` for the train job."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.train import (
    CheckpointConfig,
    DataConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from imgpipe import storage
from imgpipe.checkpoint import load_meta
from imgpipe.config import TrainConfig
from imgpipe.constants import (
    LABEL,
    LOCAL_STREAM,
    METRIC_MODES,
    PIXELS,
    TEST,
    TRAIN,
    VAL,
    val_key,
)
from imgpipe.data.manifest import Manifest, load_manifest
from imgpipe.data.partner_pool import build_partner_pool, pool_per_class
from imgpipe.data.pipeline import (
    ID_HASH,
    StreamPlan,
    build_decoded,
    build_train_stream,
    start_epoch_clock,
)
from imgpipe.data.rebalance import expected_epoch_counts, sampling_rates
from imgpipe.data.transforms import Preprocess
from imgpipe.errors import ImgpipeFailure, UserError
from imgpipe.models.weights import load_model_weights, resolve_model_config, target_state_dict
from imgpipe.runtime import plan_resources, train_worker_runtime_env
from imgpipe.training.defaults import resolve_input_size
from imgpipe.training.entry import train_loop_per_worker
from imgpipe.training.progress import EpochProgress
from imgpipe.training.recovery import (
    RESUME_KEY,
    FailureNotice,
    kept_checkpoints,
    stage_resume_checkpoint,
)
from imgpipe.training.scoring import score_checkpoint_remotely
from imgpipe.training.steps import plan_epoch_steps
from imgpipe.training.trial_run import fit_in_trial_actor, last_line


def quiet_data_progress() -> None:
    """Ray Data's per-dataset progress bars flood the log from inside train workers."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


@dataclass
class RunInputs:
    """Everything a Ray Train trainer needs, built once on the driver."""

    config: TrainConfig
    manifest: Manifest
    preprocess: Preprocess
    datasets: dict[str, ray.data.Dataset]
    loop_config: dict[str, Any]
    corrupt: dict[str, int | None] = field(default_factory=dict)
    clock: Any = None

    def close(self) -> None:
        if self.clock is not None:
            ray.kill(self.clock)
            self.clock = None


# A step (all workers) larger than this many resampled epochs is worth a note at start.
LARGE_BATCH_RATIO = 4


@dataclass
class DecodedSplits:
    """Train and val decoded once (and cached); shareable by every trial of a search."""

    preprocess: Preprocess
    train: ray.data.Dataset
    val: ray.data.Dataset
    corrupt: dict[str, int | None]


def build_decoded_splits(cfg: TrainConfig, manifest: Manifest, pre: Preprocess | None = None,
                         runtime_env: dict | None = None) -> DecodedSplits:
    """Decode train and val with ``pre``, by default the preprocessing ``cfg`` resolves to
    (its weights' own, else the data's; cached if asked). ``runtime_env``: that of the train
    workers that will read them (see :func:`~imgpipe.data.pipeline.build_decoded`)."""
    quiet_data_progress()
    if pre is None:
        _, pre = resolve_model_config(cfg.model, manifest.preprocess,
                                      load_model_weights(cfg.model))
    train, train_bad = build_decoded(cfg.data, TRAIN, pre, cache=cfg.cache_decoded,
                                     runtime_env=runtime_env)
    if not cfg.refit:
        val, val_bad = build_decoded(cfg.data, VAL, pre, cache=cfg.cache_decoded,
                                     columns=(PIXELS, LABEL), runtime_env=runtime_env)
        return DecodedSplits(pre, train, val, {TRAIN: train_bad, VAL: val_bad})
    # A refit streams val too, with every train column (the row ids key the resampling
    # draws): val is decoded once, and the per-epoch val pass reads a projection of it.
    rows, val_bad = build_decoded(cfg.data, VAL, pre, cache=cfg.cache_decoded,
                                  runtime_env=runtime_env)
    train, val = train.union(rows), rows.select_columns([PIXELS, LABEL])
    if cfg.cache_decoded:
        train, val = train.materialize(), val.materialize()
    return DecodedSplits(pre, train, val, {TRAIN: train_bad, VAL: val_bad})


def fit_counts(cfg: TrainConfig, manifest: Manifest) -> list[int]:
    """Per-class image counts of what ``cfg`` trains on: train, plus val with ``refit``."""
    splits = (TRAIN, VAL) if cfg.refit else (TRAIN,)
    return [sum(c) for c in zip(*(manifest.counts_vector(s) for s in splits), strict=True)]


def prepare_inputs(cfg: TrainConfig,
                   decoded: DecodedSplits | Sequence[DecodedSplits] | None = None) -> RunInputs:
    """Read the manifest, decode (and cache) train/val unless ``decoded`` holds them with this
    run's preprocessing, and plan the per-epoch resampling and the optimizer steps per epoch."""
    quiet_data_progress()
    if cfg.deterministic:
        # Block order otherwise depends on task timing; reproducible batches need it fixed.
        ray.data.DataContext.get_current().execution_options.preserve_order = True
    manifest = load_manifest(cfg.data)
    weights = load_model_weights(cfg.model)
    model_cfg, pre = resolve_model_config(cfg.model, manifest.preprocess, weights)
    cfg = cfg.model_copy(update={"model": model_cfg})
    shared = [decoded] if isinstance(decoded, DecodedSplits) else list(decoded or [])
    # a search's shared splits hold train alone: a refit decodes its own train+val
    decoded = None if cfg.refit else next((d for d in shared if d.preprocess == pre), None)
    if decoded is None:
        decoded = build_decoded_splits(cfg, manifest, pre, runtime_env=host_runtime_env(cfg))
    counts = fit_counts(cfg, manifest)
    rates = sampling_rates(counts, cfg.sampler.strategy)
    epoch_rows = float(expected_epoch_counts(counts, rates).sum())
    steps = plan_epoch_steps(epoch_rows, cfg.num_workers, cfg.batch_size, cfg.min_steps_per_epoch)
    # Several ranks share one streaming_split execution, fixed when the split is made: the
    # epoch reaches its tasks through a clock actor. One rank builds each epoch's stream
    # itself with the epoch in the plan: no clock process, no actor call per map task.
    split = cfg.num_workers > 1
    clock_name, clock = start_epoch_clock() if split else (None, None)
    plan = StreamPlan(rates=tuple(float(r) * steps.repeat for r in rates), seed=cfg.seed,
                      clock_name=clock_name, augment=cfg.augment, preprocess=pre)
    loop_config = {
        "train": cfg.model_dump(mode="json"),
        "preprocess": pre.model_dump(mode="json"),
        "class_names": list(manifest.class_names),
        "train_counts": [int(c) for c in counts],
        "sampling_rates": [float(r) for r in rates],
        "epoch_rows": epoch_rows * steps.repeat,
        "epoch_steps": steps.steps,
        "epoch_repeat": steps.repeat,
        "clock_name": clock_name,
        # Through the object store, so workers on other nodes need no copy of the file.
        "init_weights": ray.put(target_state_dict(weights, model_cfg.name, manifest.class_names))
        if weights is not None else None,
        "weights": weights.summary() if weights is not None else None,
    }
    if cfg.mix.enabled and cfg.mix.partner == "balanced":
        k = pool_per_class(counts, cfg.mix.pool_per_class, pre.image_size ** 2 * pre.channels)
        loop_config["partner_pool"] = ray.put(
            build_partner_pool(decoded.train, counts, k, cfg.seed, ID_HASH))
    datasets = {VAL: decoded.val}
    if split:
        datasets[TRAIN] = build_train_stream(decoded.train, plan)
    else:
        loop_config[LOCAL_STREAM] = {"decoded": decoded.train, "plan": plan}
    return RunInputs(cfg, manifest, pre, datasets, loop_config, dict(decoded.corrupt), clock)


def build_trainer(inputs: RunInputs, name: str, storage_path: str,
                  callbacks: list | None = None) -> DataParallelTrainer:
    """A Ray Train ``TorchTrainer`` for a run of several workers (the train job, or one Tune
    trial): its backend sets up the DDP process group (gloo, or NCCL with ``use_gpu``). A
    one-worker run is hosted by Tune instead (:mod:`imgpipe.training.trial_run`).

    Worker and node failures are recovered by Ray Train itself (``FailureConfig``): it restarts
    the worker group, which restores the latest reported checkpoint (``cfg.max_failures`` times).
    """
    cfg = inputs.config
    loop_config = inputs.loop_config
    if cfg.resume:
        loop_config = {**loop_config,
                       RESUME_KEY: stage_resume_checkpoint(cfg.resume, storage_path, name)}
    resources = worker_resources(cfg)
    common = dict(
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        datasets=inputs.datasets,
        # (a single rank streams train from its own process, ``LOCAL_STREAM``)
        dataset_config=DataConfig(datasets_to_split=[TRAIN] if TRAIN in inputs.datasets else []),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(**kept_checkpoints(cfg)),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            # Train logs every report at INFO (the whole metrics dict, per rank).
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=[*(callbacks or []), FailureNotice(cfg.max_failures)],
        ),
    )
    from ray.train.torch import TorchConfig, TorchTrainer  # imports torch

    return TorchTrainer(train_loop_per_worker,
                        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
                        **common)


def hosted_by_tune(cfg: TrainConfig) -> bool:
    """Whether the train job runs ``cfg`` in a one-trial Tune run's actor
    (:mod:`imgpipe.training.trial_run`) rather than as a Ray Train run: one worker needs no
    process group, and Ray Train's controller and helper actors cost more than the epochs of a
    short run."""
    return cfg.num_workers == 1


def host_runtime_env(cfg: TrainConfig) -> dict:
    """The runtime env of the processes that will stream ``cfg``'s train split (the trial actor
    of a Tune-hosted run, or Ray Train's workers): decode and scoring tasks given it reuse their
    warm processes (:func:`~imgpipe.runtime.train_worker_runtime_env`)."""
    tune_hosted = hosted_by_tune(cfg)
    return train_worker_runtime_env(tune_trial=tune_hosted, ray_train=not tune_hosted)


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """What one training worker holds: its CPUs, and its GPU share with ``use_gpu``."""
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    return resources


def storage_for(cfg: TrainConfig) -> str:
    if cfg.storage_path:
        return storage.absolute_location(cfg.storage_path)
    return storage.join(storage.absolute_location(cfg.out), "ray_results")


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Plan, train, keep the best checkpoint in ``<out>/best``, evaluate it on test.

    Returns the results dict (also written to ``<out>/results.json`` by the caller).
    """
    plan = plan_resources(cfg.num_workers, cfg.cpus_per_worker, cfg.use_gpu, cfg.gpus_per_worker)
    started = time.perf_counter()
    out = storage.absolute_location(cfg.out)
    cfg, size_line = resolve_input_size(cfg, load_manifest(cfg.data))
    inputs = prepare_inputs(cfg)
    if cfg.progress:
        steps, repeat = inputs.loop_config["epoch_steps"], inputs.loop_config["epoch_repeat"]
        passes = f" ({repeat} augmented passes)" if repeat > 1 else ""
        # the architecture is known only once the weights are resolved (prepare_inputs)
        print(f"{inputs.config.model.name}: {size_line}; {cfg.num_workers} worker(s) x batch "
              f"{cfg.batch_size}, {_count(steps, 'step')} per epoch{passes}, "
              f"{_count(cfg.epochs, 'epoch')}", flush=True)
        rows = inputs.loop_config["epoch_rows"] / repeat  # one resampled pass
        if cfg.num_workers * cfg.batch_size > LARGE_BATCH_RATIO * rows:
            print(f"note: a step takes {cfg.num_workers} x {cfg.batch_size} rows, "
                  f"{cfg.num_workers * cfg.batch_size / rows:.0f}x the {rows:.0f}-row epoch: "
                  "each epoch repeats every image many times; a smaller --batch-size gives the "
                  "same number of steps for less compute", flush=True)
        if cfg.refit:
            print(f"refit: training on train+val ({sum(inputs.loop_config['train_counts'])} "
                  "images); nothing is held out, so the last epoch is kept and val scores are "
                  "in-sample", flush=True)
    name = f"train-{int(time.time())}"
    try:
        if hosted_by_tune(cfg):
            result = fit_in_trial_actor(cfg, inputs.datasets, inputs.loop_config, name=name,
                                        storage_path=storage_for(cfg),
                                        resources=worker_resources(cfg))
        else:
            trainer = build_trainer(inputs, name=name, storage_path=storage_for(cfg),
                                    callbacks=([EpochProgress(cfg.epochs, in_sample=cfg.refit)]
                                               if cfg.progress else None))
            result = trainer.fit()
    finally:
        inputs.close()
    # (Ray's get_best_checkpoint raises, rather than returning None, when there is none)
    if result.checkpoint is None or result.error is not None:
        why = (f"error: {last_line(str(result.error), 300) or type(result.error).__name__}"
               if result.error is not None else
               "no epoch ran; a --resume checkpoint that already ran --epochs epochs?")
        raise TrainingFailed(f"training produced no checkpoint ({why})"
                             if result.checkpoint is None else
                             f"training failed after its restarts ({why}); its latest "
                             f"checkpoint is at {result.checkpoint.path}")
    best = (result.checkpoint if cfg.refit
            else result.get_best_checkpoint(val_key(cfg.metric), METRIC_MODES[cfg.metric]))
    # Scored before publishing, so ``<out>`` never holds a best checkpoint that its
    # results.json does not describe; the data path is absolute because a Ray worker's working
    # directory need not be the driver's.
    try:
        scores = score_checkpoint_remotely(best, storage.absolute_location(cfg.data),
                                           (TEST, VAL), runtime_env=host_runtime_env(cfg))
    except UserError as e:
        raise ScoringFailed(f"scoring the kept checkpoint failed: {e}. The trained checkpoint "
                            f"is at {best.path}; {out} was left as it was") from e
    test, val = scores[TEST], scores[VAL]
    with tempfile.TemporaryDirectory(prefix="imgpipe-best-") as tmp:
        best.to_directory(tmp)
        best_dir = _publish_best(tmp, storage.join(out, "best"))
    history, restarts = _history(result)
    return {
        "config": inputs.config.model_dump(mode="json"),
        "weights": inputs.loop_config["weights"],
        "resource_plan": plan.summary(),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "class_names": list(inputs.manifest.class_names),
        "train_counts": inputs.loop_config["train_counts"],
        "sampling_rates": inputs.loop_config["sampling_rates"],
        "corrupt_skipped": inputs.corrupt,
        "best_epoch": (history[-1]["epoch"] if cfg.refit and history
                       else _best_epoch(history, cfg.metric)),
        "refit": cfg.refit,
        "best_checkpoint": best_dir,
        "restarts": restarts,
        "val": val,
        "test": test,
        "history": history,
    }


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _best_epoch(history: list[dict[str, Any]], metric: str) -> int | None:
    scores = [h[val_key(metric)] for h in history]
    if not scores:
        return None
    pick = np.argmax if METRIC_MODES[metric] == "max" else np.argmin
    return int(history[int(pick(scores))]["epoch"])


def _publish_best(local_dir: str, dest: str) -> str:
    """Replace ``dest`` (local or URI) with the best checkpoint; local folders swap by rename."""
    if storage.is_uri(dest):
        return storage.upload_dir(local_dir, dest)
    dest_path = Path(dest)
    dest_path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".best-", dir=dest_path.parent))
    os.chmod(staging, storage.default_mode(directory=True))
    shutil.copytree(local_dir, staging, dirs_exist_ok=True)
    old = dest_path.with_name(f".{dest_path.name}-old-{os.getpid()}")
    if dest_path.exists():
        os.rename(dest_path, old)
    os.rename(staging, dest_path)
    shutil.rmtree(old, ignore_errors=True)
    return str(dest_path)


class TrainingFailed(ImgpipeFailure):
    """The run ended without a usable checkpoint."""


class ScoringFailed(UserError):
    """The kept checkpoint could not be scored on the held-out splits for a reason the user
    can fix (e.g. a split file removed during the run); the message says where it is kept."""


def _history(result) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-epoch scalar metrics and the restores Ray Train made, from the latest checkpoint."""
    if result.checkpoint is None:
        return [], []
    with result.checkpoint.as_directory() as d:
        meta = load_meta(d)
    return meta.get("history", []), meta.get("restarts", [])
