"""Layered configs fail loudly, naming the field."""

from __future__ import annotations

import pytest

from imgpipe.config import ConfigError, PrepareConfig, TrainConfig, TuneJobConfig, resolve_config


def test_defaults_yaml_and_overrides_layer(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 7\noptim:\n  lr: 0.5\n  name: sgd\nloss:\n  name: focal\n")
    cfg = resolve_config(TrainConfig, f, {"optim.lr": 0.1, "seed": None})
    assert cfg.epochs == 7 and cfg.optim.name == "sgd" and cfg.loss.name == "focal"
    assert cfg.optim.lr == 0.1  # flag beats file
    assert cfg.seed == 0  # None override leaves the default


@pytest.mark.parametrize(("data", "field"), [
    ({"epochz": 3}, "epochz"),
    ({"optim": {"lr": -1}}, "optim.lr"),
    ({"optim": {"name": "lion"}}, "optim.name"),
    ({"loss": {"class_weights": "power:7"}}, "loss.class_weights"),
    ({"sampler": {"strategy": "balanced"}}, "sampler.strategy"),
    ({"amp": True}, "amp"),
    ({"num_workers": 0}, "num_workers"),
])
def test_bad_values_name_the_field(tmp_path, data, field):
    import yaml

    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        resolve_config(TrainConfig, f)


def test_prepare_needs_exactly_one_source():
    with pytest.raises(ConfigError, match="exactly one of"):
        resolve_config(PrepareConfig, None, {"dataset": "digits-lt", "image_folder": "x"})
    assert resolve_config(PrepareConfig, None, {"dataset": "digits-lt"}).imbalance_ratio == 100


def test_yaml_must_be_a_mapping(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        resolve_config(TrainConfig, f)


@pytest.mark.parametrize("extra", [{"loss": {"class_weights": "power:1"}},
                                   {"loss": {"name": "logit-adjusted", "tau": 1.0}}])
def test_double_correction_is_refused(extra):
    with pytest.raises(ConfigError, match="corrects the imbalance twice"):
        resolve_config(TrainConfig, None, {"sampler.strategy": "oversample",
                                           **{f"loss.{k}": v for k, v in extra["loss"].items()}})
    # one correction alone, or a weak second one, is fine
    resolve_config(TrainConfig, None, {"sampler.strategy": "sqrt", "loss.class_weights": "power:1"})
    resolve_config(TrainConfig, None, {"sampler.strategy": "oversample",
                                       "loss.class_weights": "power:0.5"})


def test_every_optimizer_name_builds_its_optimizer():
    import torch

    from imgpipe.constants import OPTIMIZER_NAMES
    from imgpipe.training.optim import create_optimizer

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    for name in OPTIMIZER_NAMES:
        opt = create_optimizer(TrainConfig(data="d").optim.model_copy(update={"name": name}), model)
        assert type(opt).__name__.lower() == name



@pytest.mark.parametrize(("overrides", "line"), [
    ({"train": {"batch_size": 0}}, "  train.batch_size: Input should be greater than or equal to 1"),
    ({"search": {"lr": [1.0, 0.0]}}, "  search.lr: range [1.0, 0.0] is reversed"),
    ({"grace_period": 10, "epochs": 3}, "  grace_period (10) exceeds epochs (3)"),
])
def test_refusals_name_the_field_without_pydantics_wrapping(overrides, line):
    with pytest.raises(ConfigError) as e:
        resolve_config(TuneJobConfig, None, overrides)
    text = str(e.value)
    assert line in text.splitlines(), text
    assert "Value error" not in text and "(top level)" not in text and "invalid train" not in text


def test_grace_period_only_matters_to_schedulers_that_stop_trials():
    resolve_config(TuneJobConfig, None, {"scheduler": "fifo", "grace_period": 10, "epochs": 3})
    with pytest.raises(ConfigError, match="grace_period"):
        resolve_config(TuneJobConfig, None, {"scheduler": "median", "grace_period": 10,
                                             "epochs": 3})
