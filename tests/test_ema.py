"""Weight averaging (``optim.ema_decay``): the average itself, and checkpoints that keep it."""

from __future__ import annotations

import copy

import pytest
import torch

from imgpipe.checkpoint import load_train_state, load_weights, save_checkpoint
from imgpipe.models import create_model
from imgpipe.models.finetune import apply_finetune
from imgpipe.training.ema import WeightEma


def _step(model: torch.nn.Module, seed: int) -> None:
    """One SGD step on random data (moves weights and BatchNorm statistics)."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(torch.randn(8, 1, 16, 16)).logsumexp(1).sum().backward()
    opt.step()
    opt.zero_grad()


def test_the_average_follows_timms_warm_up_and_copies_integer_buffers():
    torch.manual_seed(0)
    model = create_model("cnn", 3, in_channels=1)
    ema = WeightEma(0.99)
    ema.update(model)  # the first update copies
    first = copy.deepcopy(ema.state)
    assert ema.updates == 1 and ema.current_decay() == pytest.approx(2 / 11)
    _step(model, 1)
    ema.update(model)
    d = 2 / 11
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(ema.state[k], d * first[k] + (1 - d) * v)
        else:  # num_batches_tracked
            assert torch.equal(ema.state[k], v)
    # the long-run decay caps the warm-up
    ema.updates = 10_000
    assert ema.current_decay() == 0.99


def test_the_average_of_a_lora_model_is_the_plain_architecture():
    base = create_model("resnet18", 3, in_channels=1, cifar_stem=True, image_size=16)
    adapted = apply_finetune(copy.deepcopy(base), "lora", 4, 8.0)
    ema = WeightEma(0.9)
    ema.update(adapted)
    plain = create_model("resnet18", 3, in_channels=1, cifar_stem=True, image_size=16)
    ema.load_into(plain)  # strict: same keys, same shapes


def test_a_checkpoint_keeps_the_average_as_its_model_and_the_raw_weights_to_resume(tmp_path):
    torch.manual_seed(0)
    model = create_model("cnn", 3, in_channels=1)
    ema = WeightEma(0.5)
    for seed in range(3):
        _step(model, seed)
        ema.update(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    from imgpipe.training.loop import EMA_UPDATES, RAW_WEIGHTS

    save_checkpoint(tmp_path, ema.state, {"epoch": 0}, opt,
                    extra_state={RAW_WEIGHTS: model.state_dict(), EMA_UPDATES: ema.updates})
    saved = load_weights(tmp_path)
    assert all(torch.equal(saved[k], v) for k, v in ema.state.items())
    assert any(not torch.equal(saved[k], v) for k, v in model.state_dict().items()
               if v.is_floating_point())
    state = load_train_state(tmp_path)
    assert state[EMA_UPDATES] == 3
    assert all(torch.equal(state[RAW_WEIGHTS][k], v) for k, v in model.state_dict().items())


def test_ema_decay_is_validated():
    from imgpipe.config import TrainConfig

    assert TrainConfig.model_validate({"optim": {"ema_decay": 0.99}}).optim.ema_decay == 0.99
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="ema_decay"):
            TrainConfig.model_validate({"optim": {"ema_decay": bad}})


@pytest.mark.slow
@pytest.mark.ray
def test_a_run_with_weight_averaging_scores_and_resumes_from_its_checkpoints(ray_session,
                                                                            tiny_digits,
                                                                            tmp_path):
    """The val scores and the kept model are the average; a resumed run goes on from the raw
    weights and the average's own count of updates."""
    from test_training import small_config

    from imgpipe.evaluate import evaluate_checkpoint
    from imgpipe.training.loop import EMA_UPDATES, RAW_WEIGHTS
    from imgpipe.training.trainer import run_training

    cfg = small_config(tiny_digits, tmp_path / "run", epochs=2, num_workers=1,
                       min_steps_per_epoch=3, **{"optim.ema_decay": 0.9})
    res = run_training(cfg)
    steps = res["history"][0]["train_steps"]
    best = res["best_checkpoint"]
    state = load_train_state(best)
    assert state[EMA_UPDATES] == steps * (res["best_epoch"] + 1)
    weights = load_weights(best)
    assert any(not torch.equal(weights[k], v) for k, v in state[RAW_WEIGHTS].items()
               if v.is_floating_point())
    # the published scores are those of the averaged weights the bundle loads
    assert res["val"] == evaluate_checkpoint(best, tiny_digits, "val")
    assert res["history"][res["best_epoch"]]["val_macro_f1"] == res["val"]["macro_f1"]

    last = sorted((tmp_path / "run" / "ray_results").glob("train-*/run/checkpoint_*"))[-1]
    resumed = run_training(cfg.model_copy(update={"epochs": 3, "resume": str(last),
                                                  "out": str(tmp_path / "resumed")}))
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2]
    assert resumed["history"][:2] == res["history"]
    final = sorted((tmp_path / "resumed" / "ray_results").glob("train-*/run/checkpoint_*"))[-1]
    assert load_train_state(final)[EMA_UPDATES] == 3 * steps
