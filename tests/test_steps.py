"""Step parity across DDP ranks and the step-based epoch plan."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from imgpipe.training.steps import exact_batches, plan_epoch_steps


def _stream(sizes: list[int]):
    start = 0
    for n in sizes:
        yield {"pixels": torch.arange(start, start + n), "label": torch.arange(start, start + n)}
        start += n


@pytest.mark.parametrize("sizes", [[256, 17, 256, 3, 100], [5] * 90, [1000], [300, 0, 211]])
def test_exact_batches_cuts_any_stream_into_equal_steps(sizes):
    out = list(exact_batches(_stream(sizes), steps=3, batch_size=128, seed=1))
    assert [len(b["label"]) for b in out] == [128] * 3
    # rows come in stream order while the stream lasts; nothing is repeated
    flat = torch.cat([b["label"] for b in out])
    if sum(sizes) >= 3 * 128:
        assert flat.tolist() == list(range(3 * 128))


def test_exact_batches_drains_the_rest_of_the_stream():
    consumed = []

    def stream():
        for i, b in enumerate(_stream([100] * 10)):
            consumed.append(i)
            yield b

    assert len(list(exact_batches(stream(), steps=2, batch_size=64))) == 2
    assert consumed == list(range(10))  # a streaming split needs every rank to take its share


def test_exact_batches_short_stream_redraws_seen_rows_deterministically():
    a = list(exact_batches(_stream([70, 30]), steps=4, batch_size=64, seed=3))
    b = list(exact_batches(_stream([70, 30]), steps=4, batch_size=64, seed=3))
    assert len(a) == 4 and all(len(x["label"]) == 64 for x in a)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["label"], y["label"])
    # pixels and labels of a redrawn row stay paired
    assert all(torch.equal(x["pixels"], x["label"]) for x in a)
    assert set(torch.cat([x["label"] for x in a[1:]]).tolist()) <= set(range(100))


def test_exact_batches_refuses_an_empty_stream():
    with pytest.raises(ValueError, match="no rows"):
        list(exact_batches(_stream([0, 0]), steps=1, batch_size=8))


def test_plan_epoch_steps_guarantees_a_minimum_on_small_data():
    # digits-lt rho=100: 254 rows, batch 64, 2 ranks → one natural step
    plan = plan_epoch_steps(254, world_size=2, batch_size=64, min_steps=10)
    assert plan.natural_steps == 1 and plan.steps == 10
    assert plan.repeat * 254 >= plan.steps * 2 * 64  # the stream feeds the steps with fresh rows
    big = plan_epoch_steps(20_000, world_size=2, batch_size=64, min_steps=10)
    assert big.steps == 156 and big.repeat == 1
    with pytest.raises(ValueError, match="num_workers"):
        plan_epoch_steps(1, world_size=2, batch_size=64, min_steps=1)


def test_lr_schedule_runs_over_steps_warmup_then_cosine():
    from imgpipe.config import OptimConfig
    from imgpipe.training.optim import lr_factor

    cfg = OptimConfig(warmup_epochs=1, min_lr_ratio=0.01)
    steps, epochs = 10, 5
    f = [lr_factor(e + i / steps, epochs, cfg) for e in range(epochs) for i in range(steps)]
    assert f[0] < f[5] < f[9] <= 1.0  # warm-up rises step by step inside the first epoch
    assert f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))  # then cosine decays
    assert f[-1] == pytest.approx(0.01, abs=0.01)


def count_steps_loop(config):
    """Every rank runs the real loop's batching on its shard; rank 0 writes all counts."""
    import ray.train
    import torch.distributed as dist

    from imgpipe.data.pipeline import set_epoch
    from imgpipe.training.steps import exact_batches

    rank = ray.train.get_context().get_world_rank()
    shard = ray.train.get_dataset_shard("train")
    counts = []
    for epoch in range(2):
        set_epoch(config["clock_name"], epoch)
        raw = shard.iter_torch_batches(batch_size=256, local_shuffle_buffer_size=256,
                                       local_shuffle_seed=epoch)
        steps = 0
        for batch in exact_batches(raw, config["epoch_steps"], 256, seed=rank):
            assert len(batch["label"]) == 256
            dist.all_reduce(torch.ones(1))  # a DDP step: hangs if counts differ
            steps += 1
        counts.append(steps)
    gathered = [None, None]
    dist.all_gather_object(gathered, counts)
    if rank == 0:
        Path(config["result_file"]).write_text(json.dumps(gathered))
    ray.train.report({"done": 1})


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["oversample", "sqrt"])
def test_two_ranks_run_equal_steps_with_large_batches(ray_session, tiny_digits, tmp_path,
                                                       sampler):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from imgpipe.config import TrainConfig
    from imgpipe.training.trainer import prepare_inputs

    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = TrainConfig.model_validate({
        "data": tiny_digits, "out": str(tmp_path), "num_workers": 2, "batch_size": 256,
        "shuffle_buffer": 256, "min_steps_per_epoch": 3, "model": {"image_size": 16},
        "sampler": {"strategy": sampler}})
    inputs = prepare_inputs(cfg)
    try:
        TorchTrainer(
            count_steps_loop,
            train_loop_config={**inputs.loop_config, "result_file": str(tmp_path / "r.json")},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.45}),
            datasets=inputs.datasets,
            run_config=RunConfig(name="parity", storage_path=str(tmp_path))).fit()
    finally:
        inputs.close()
    counts = json.loads((tmp_path / "r.json").read_text())
    steps = inputs.loop_config["epoch_steps"]
    assert steps >= 3
    assert counts == [[steps, steps], [steps, steps]]
