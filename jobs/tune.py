"""Search hyperparameters and class-imbalance handling with Ray Tune + Optuna; export the best.

    python jobs/tune.py                      # embedded digits-lt, prepared if missing
    python jobs/tune.py --data data/digits-lt --num-samples 16 --out runs/tune-1
    python jobs/tune.py --data data/mine --candidates bundles/a resnet50.IMAGENET1K_V2 --top-k 2
"""

from __future__ import annotations

import argparse
import sys

from imgpipe import storage
from imgpipe.config import TrainConfig, TuneJobConfig
from imgpipe.config.cli import add_job_flag, add_section_flags, config_parser, parse_job_args
from imgpipe.errors import run_job
from imgpipe.logs import configure_console
from imgpipe.models.weights import check_weights
from imgpipe.preflight import check_tune_config
from imgpipe.runtime import init_ray
from imgpipe.training.trial_run import RunInterrupted
from imgpipe.tuning.job import check_data_source, run_tune_job
from imgpipe.tuning.tuner import SearchInterrupted

# Fields every trial shares, settable without a YAML file: flag → TrainConfig field (train.*).
TRIAL_FLAGS = {
    "model": "model.name", "image-size": "model.image_size", "weights": "model.weights",
    "finetune": "model.finetune", "lora-rank": "model.lora_rank",
    "head-lr": "optim.head_lr", "layer-decay": "optim.layer_decay",
}


def get_args_parser() -> argparse.ArgumentParser:
    p = config_parser(TuneJobConfig, __doc__, renamed={"init-checkpoint": "weights"})
    add_section_flags(p, TrainConfig, "train", TRIAL_FLAGS)
    add_job_flag(p, "--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    add_job_flag(p, "--verbose", dest="ray_verbose", action="store_true",
                 help="show Ray's own INFO lines and progress bars on the console")
    return p


def _main(argv: list[str] | None) -> int:
    tcfg, job = parse_job_args(TuneJobConfig, get_args_parser(), argv)
    configure_console(verbose=job["ray_verbose"])
    storage.check_durable({"--out": tcfg.out, "--bundle-root": tcfg.bundle_root,
                           "--storage-path": tcfg.storage_path})
    check_data_source(tcfg)  # a folder without shards fails before Ray starts
    check_tune_config(tcfg)  # train/search vectors against the data's classes, before Ray
    model = tcfg.train.get("model") or {}
    check_weights(model.get("weights") or model.get("init_checkpoint"))  # before Ray starts
    init_ray(job["address"])
    try:
        results = run_tune_job(tcfg)
    except SearchInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except RunInterrupted as e:  # the refit, after the search ended
        print(f"\nrefit {e.epochs_line}; the search's trials are kept: the same command with "
              f"--resume --name {tcfg.name} reuses them and runs the refit again", file=sys.stderr)
        return 130
    print(f"\nwall time {results['wall_time_s']:.1f} s; results in {results['results_file']}, "
          f"bundle in {results['bundle']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(lambda: _main(argv), "tune")


if __name__ == "__main__":
    sys.exit(main())
