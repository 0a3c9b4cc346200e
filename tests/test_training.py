"""Ray Train V2 (TorchTrainer, DDP on gloo) with the real loop on tiny long-tailed digits."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from imgpipe.checkpoint import load_meta, load_train_state, load_weights, save_checkpoint
from imgpipe.config import TrainConfig
from imgpipe.constants import PER_CLASS_RECALL, TEST, TRAIN, VAL
from imgpipe.models import create_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


def small_config(data: str, out: Path, **kw) -> TrainConfig:
    base = {"data": data, "out": str(out), "epochs": 2, "num_workers": 2, "batch_size": 32,
            "model": {"image_size": 16}, "augment": {"rotation_degrees": 0.0}}
    for key, value in kw.items():
        node = base
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return TrainConfig.model_validate(base)


def ddp_step_loop(config):
    """One epoch of the real train_one_epoch on 2 ranks, then report every rank's parameters."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from imgpipe.config import TrainConfig
    from imgpipe.data.pipeline import set_epoch
    from imgpipe.data.transforms import Preprocess
    from imgpipe.losses import create_loss
    from imgpipe.models import create_model, unwrap_model
    from imgpipe.training.loop import train_one_epoch
    from imgpipe.training.optim import create_optimizer

    cfg = TrainConfig.model_validate(config["train"])
    pre = Preprocess.model_validate(config["preprocess"])
    torch.manual_seed(ray.train.get_context().get_world_rank())  # different init per rank
    model = ray.train.torch.prepare_model(create_model("cnn", 10, in_channels=1))
    opt = create_optimizer(cfg.optim, model.parameters())
    set_epoch(config["clock_name"], 0)
    loader = ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=cfg.batch_size)
    train_one_epoch(model, loader, create_loss(cfg.loss, config["train_counts"]), opt,
                    torch.amp.GradScaler("cuda", enabled=False), cfg, pre, 0, 10,
                    torch.device("cpu"))
    flat = torch.cat([p.detach().flatten() for p in unwrap_model(model).parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    diff = max(float((g - gathered[0]).abs().max()) for g in gathered)
    if dist.get_rank() == 0:  # V2 results carry metrics only with a checkpoint: use a file
        Path(config["result_file"]).write_text(json.dumps({"diff": diff, "norm": float(flat.norm())}))
    ray.train.report({"max_param_diff": diff})


def test_two_ddp_workers_hold_identical_parameters(ray_session, tiny_digits, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from imgpipe.training.trainer import prepare_inputs

    # workers cannot import the test module: ship this function by value
    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    inputs = prepare_inputs(small_config(tiny_digits, tmp_path))
    try:
        trainer = TorchTrainer(
            ddp_step_loop,
            train_loop_config={**inputs.loop_config, "result_file": str(tmp_path / "r.json")},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.45}),
            datasets=inputs.datasets,
            run_config=RunConfig(name="ddp", storage_path=str(tmp_path)))
        trainer.fit()
    finally:
        inputs.close()
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["diff"] == 0.0 and got["norm"] > 0


def task_workers(name: str) -> set[str]:
    """Ids of the worker processes that ran tasks called ``name`` in this Ray session."""
    from ray.util.state import list_tasks

    tasks = list_tasks(filters=[("name", "=", name)], limit=10_000, detail=True,
                       raise_on_missing_output=False)
    return {t.worker_id for t in tasks if t.worker_id}


def finished_task_workers(name: str, wait_s: float = 30.0) -> set[str]:
    """:func:`task_workers` once the task's events reached the GCS (workers flush them about
    once a second, so a task that just returned may not be listed yet)."""
    deadline = time.monotonic() + wait_s
    while not (workers := task_workers(name)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return workers


def actors_of(*class_names: str) -> set[str]:
    """Ids of this Ray session's actors (alive or dead) of these classes."""
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(limit=10_000, raise_on_missing_output=False)
            if a.class_name in class_names}


def test_train_end_to_end_with_corrupt_images_and_resume(ray_session, corrupt_digits, tmp_path):
    from imgpipe.training.trainer import run_training

    data, n_bad = corrupt_digits
    cfg = small_config(data, tmp_path / "run", epochs=4, min_steps_per_epoch=2,
                       **{"sampler.strategy": "oversample", "optim.lr": 0.01})
    res = run_training(cfg)
    assert res["corrupt_skipped"][TRAIN] == n_bad
    # the stream's map tasks ran in a process the driver's decode had warmed (same runtime env)
    assert task_workers("MapBatches(decode_batch)->MapBatches(drop_corrupt)") & task_workers(
        "MapBatches(resample_and_augment)")
    hist = res["history"]
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    # oversampling: an epoch holds ~ num_classes x head rows, not the long-tailed count
    assert hist[0]["train_rows"] > 1.5 * (sum(res["train_counts"]) - n_bad)
    tail = int(np.argmin(res["train_counts"]))
    assert res["test"][PER_CLASS_RECALL][tail] > 0
    assert res["test"]["num_rows"] == 100 and res["test"]["skipped_corrupt"] == 0
    # the final scores came from a Ray task in a process of the run's own data tasks (torch
    # already imported), and are what scoring the published checkpoint here gives
    assert finished_task_workers("score_checkpoint") & (task_workers(
        "MapBatches(decode_batch)->MapBatches(drop_corrupt)") | task_workers(
        "MapBatches(resample_and_augment)"))
    from imgpipe.evaluate import evaluate_checkpoint

    assert res["test"] == evaluate_checkpoint(res["best_checkpoint"], str(data), TEST)
    assert res["val"] == evaluate_checkpoint(res["best_checkpoint"], str(data), VAL)

    # checkpoint round trip: the saved best is a complete checkpoint
    best = Path(res["best_checkpoint"])
    meta = load_meta(best)
    assert meta["class_names"] == res["class_names"] and "optimizer" in load_train_state(best)

    # resume from the last epoch's checkpoint: only the remaining epochs run
    last = sorted((tmp_path / "run" / "ray_results").glob("train-*/checkpoint_2*"))[-1]
    resumed = run_training(cfg.model_copy(update={"epochs": 6, "resume": str(last),
                                                  "out": str(tmp_path / "resumed")}))
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2, 3, 4, 5]
    assert resumed["history"][:4] == hist


def test_one_worker_runs_are_hosted_by_tune_and_ddp_runs_by_ray_train(ray_session, tiny_digits,
                                                                       tmp_path):
    """One worker trains in a one-trial Tune run's actor (no Train controller, worker group or
    helper actors to start); several workers are a Ray Train TorchTrainer run (DDP). The
    decode and scoring tasks run in the runtime env of the process that streams."""
    from ray.train.torch import TorchTrainer

    from imgpipe.runtime import train_worker_runtime_env
    from imgpipe.training.trainer import (
        build_trainer,
        host_runtime_env,
        hosted_by_tune,
        prepare_inputs,
    )

    one = small_config(tiny_digits, tmp_path, num_workers=1)
    assert hosted_by_tune(one)
    assert host_runtime_env(one) == train_worker_runtime_env(tune_trial=True, ray_train=False)
    two_cfg = small_config(tiny_digits, tmp_path / "two", num_workers=2)
    assert not hosted_by_tune(two_cfg) and host_runtime_env(two_cfg) == train_worker_runtime_env()
    two = prepare_inputs(two_cfg)
    try:
        assert isinstance(build_trainer(two, "t2", str(tmp_path)), TorchTrainer)
    finally:
        two.close()


def ingest_options_loop(config):
    """Report the preserve_order the one-rank stream executes with (the real helper)."""
    import ray.train

    from imgpipe.training.loop import LOCAL_STREAM, local_train_stream

    stream = local_train_stream(config[LOCAL_STREAM], 0)
    Path(config["result_file"]).write_text(
        json.dumps(stream.context.execution_options.preserve_order))
    ray.train.report({"done": 1})


def test_one_rank_stream_takes_the_runs_ingest_options(ray_session, tiny_digits, tmp_path):
    """A search decodes once on the driver, before a --deterministic trial sets preserve_order:
    the one-rank stream must still run ordered, as Train's own datasets do."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.backend import BackendConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from imgpipe.data.manifest import load_manifest
    from imgpipe.training.trainer import build_decoded_splits, prepare_inputs

    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = small_config(tiny_digits, tmp_path, num_workers=1, deterministic=True)
    ctx = ray_session.data.DataContext.get_current()
    old = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = False
    try:
        shared = build_decoded_splits(cfg, load_manifest(tiny_digits))
        assert shared.train.context.execution_options.preserve_order is False
        inputs = prepare_inputs(cfg, shared)  # sets preserve_order, as in a trial
        DataParallelTrainer(
            ingest_options_loop, backend_config=BackendConfig(),
            train_loop_config={**inputs.loop_config, "result_file": str(tmp_path / "r.json")},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.45}),
            datasets=inputs.datasets,
            run_config=RunConfig(name="ingest", storage_path=str(tmp_path))).fit()
        inputs.close()
    finally:
        ctx.execution_options.preserve_order = old
    assert json.loads((tmp_path / "r.json").read_text()) is True


def test_checkpoint_round_trip(tmp_path):
    model = create_model("cnn", 4, in_channels=1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, model, {"epoch": 3, "x": [1, 2]}, opt)
    clone = create_model("cnn", 4, in_channels=1)
    clone.load_state_dict(load_weights(tmp_path))
    for a, b in zip(model.state_dict().values(), clone.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    opt2 = torch.optim.AdamW(clone.parameters(), lr=0.1)
    opt2.load_state_dict(load_train_state(tmp_path)["optimizer"])
    assert opt2.state_dict()["state"][0]["step"] == 1
    assert load_meta(tmp_path) == {"epoch": 3, "x": [1, 2]}


def test_train_job_rejects_bad_config_before_starting_ray(tmp_path):
    proc = subprocess.run(
        [sys.executable, "jobs/train.py", "--data", "nowhere", "--lr", "-1",
         "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "optim.lr" in proc.stderr
    assert "Ray" not in proc.stdout  # nothing started


def test_results_json_written_by_job(ray_session, tiny_digits, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    out = tmp_path / "job"
    coordinators = actors_of("EpochClock", "SplitCoordinator")
    proc = subprocess.run(
        [sys.executable, "jobs/train.py", "--data", tiny_digits, "--epochs", "2",
         "--num-workers", "1", "--image-size", "16", "--loss", "logit-adjusted",
         "--out", str(out), "--address", address],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch   2/2" in proc.stdout and "balanced_accuracy" in proc.stdout
    # one rank streams from its own process: no epoch-clock or split-coordinator actor started
    assert actors_of("EpochClock", "SplitCoordinator") == coordinators
    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"config", "wall_time_s", "val", "test", "history"}
    assert res["config"]["loss"]["name"] == "logit-adjusted"


def test_a_failed_scoring_task_raises_the_tasks_own_error(ray_session, tiny_digits, tmp_path):
    """The final scoring runs in a Ray task (``training/scoring.py``): its scores are the
    driver's, and a user error in it (a split file gone since the run started) reaches the job
    as that error, one line, not as Ray's wrapper with the remote traceback in its text."""
    import shutil

    import ray
    from ray.train import Checkpoint
    from test_bundle_publication import _checkpoint

    from imgpipe.data.manifest import ManifestError
    from imgpipe.evaluate import evaluate_checkpoint
    from imgpipe.training.scoring import score_checkpoint_remotely

    data = tmp_path / "data"
    shutil.copytree(tiny_digits, data)
    ckpt = _checkpoint(tiny_digits, tmp_path / "ckpt")
    checkpoint = Checkpoint.from_directory(str(ckpt))
    scores = score_checkpoint_remotely(checkpoint, str(data), (VAL,))
    assert scores[VAL] == evaluate_checkpoint(ckpt, str(data), VAL)
    for shard in (data / TEST).glob("*.parquet"):
        shard.unlink()
    with pytest.raises(ManifestError, match="missing") as raised:
        score_checkpoint_remotely(checkpoint, str(data), (VAL, TEST))
    assert not isinstance(raised.value, ray.exceptions.RayTaskError)
    assert "Traceback" not in str(raised.value)
