"""Train one model on prepared shards with Ray Train (DDP).

    python jobs/train.py --data data/digits-lt --num-workers 2 --epochs 30 --out runs/train-1
"""

from __future__ import annotations

import argparse
import sys

from imgpipe import storage
from imgpipe.config import TrainConfig
from imgpipe.config.cli import add_job_flag, config_parser, parse_job_args
from imgpipe.console import per_class_table
from imgpipe.errors import run_job
from imgpipe.logs import configure_console
from imgpipe.models.weights import check_weights
from imgpipe.preflight import check_train_config
from imgpipe.runtime import init_ray
from imgpipe.training.trainer import run_training
from imgpipe.training.trial_run import RunInterrupted

# Short names kept from before the flags were generated (``--help`` lists all of them).
SHORTCUTS = {
    "optim.name": "optimizer", "optim.lr": "lr", "optim.weight-decay": "weight-decay",
    "optim.head-lr": "head-lr", "optim.layer-decay": "layer-decay",
    "loss.class-weights": "class-weights", "loss.focal-gamma": "focal-gamma", "loss.tau": "tau",
    "loss.label-smoothing": "label-smoothing", "loss.drw-epoch": "drw-epoch",
    "mix.mixup-alpha": "mixup", "mix.cutmix-alpha": "cutmix", "mix.partner": "mix-partner",
    "mix.prob": "mix-prob", "model.image-size": "image-size", "model.weights": "weights",
    "model.finetune": "finetune", "model.lora-rank": "lora-rank",
}
RENAMED = {"loss": "loss.name", "model": "model.name", "sampler": "sampler.strategy",
           "no-cache": "no-cache-decoded", "init-checkpoint": "model.weights"}


def get_args_parser() -> argparse.ArgumentParser:
    p = config_parser(TrainConfig, __doc__, shortcuts=SHORTCUTS, renamed=RENAMED)
    add_job_flag(p, "--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    add_job_flag(p, "--verbose", dest="ray_verbose", action="store_true",
                 help="show Ray's own INFO lines and progress bars on the console")
    return p


def _main(argv: list[str] | None) -> int:
    cfg, job = parse_job_args(TrainConfig, get_args_parser(), argv)
    configure_console(verbose=job["ray_verbose"])
    storage.check_durable({"--out": cfg.out, "--storage-path": cfg.storage_path})
    check_train_config(cfg)  # weight/sampler vectors against the data, before Ray starts
    check_weights(cfg.model.weights)  # file/cache present: the weights error before Ray starts
    init_ray(job["address"])
    try:
        results = run_training(cfg)
    except RunInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    print("\nTest split, " + ("last epoch (refit on train+val):" if cfg.refit
                               else f"best checkpoint (by val {cfg.metric}):"))
    print(per_class_table(results["class_names"], results["train_counts"], results["test"]))
    if results["restarts"]:
        print(f"recovered from {len(results['restarts'])} worker failure(s): resumed at epoch(s) "
              + ", ".join(str(r["resumed_at_epoch"] + 1) for r in results["restarts"]))
    path = storage.write_json(storage.join(storage.absolute_location(cfg.out), "results.json"),
                              results)
    print(f"\nwall time {results['wall_time_s']:.1f} s; results in {path}, best checkpoint in "
          f"{results['best_checkpoint']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(lambda: _main(argv), "train")


if __name__ == "__main__":
    sys.exit(main())
