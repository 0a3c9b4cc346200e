"""Train one model on prepared shards with Ray Train (DDP).

    python jobs/train.py --data data/digits-lt --num-workers 2 --epochs 30 --out runs/train-1
"""

from __future__ import annotations

import argparse
import sys

from imgpipe import storage
from imgpipe.config import TrainConfig, choices, resolve_config
from imgpipe.console import per_class_table
from imgpipe.errors import run_job
from imgpipe.logs import configure_console
from imgpipe.models.weights import add_transfer_args, check_weights
from imgpipe.preflight import check_train_config
from imgpipe.runtime import init_ray
from imgpipe.training.trainer import run_training


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="YAML file (TrainConfig fields); flags override it")
    p.add_argument("--data", help="prepared shard folder (local, s3://, gs://)")
    p.add_argument("--out", help="output folder for results.json and the best checkpoint")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per worker")
    p.add_argument("--num-workers", type=int, help="Ray Train workers (DDP ranks)")
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--use-gpu", action="store_true", default=None, help="NCCL + CUDA workers")
    p.add_argument("--amp", action="store_true", default=None, help="mixed precision (GPU)")
    p.add_argument("--storage-path", help="Ray Train storage (local path, s3://, gs://)")
    p.add_argument("--seed", type=int)
    p.add_argument("--metric", choices=choices(TrainConfig, "metric"))
    p.add_argument("--patience", type=int, help="early stopping patience (epochs)")
    p.add_argument("--min-steps-per-epoch", type=int,
                   help="optimizer steps an epoch has at least on every worker (default 10)")
    p.add_argument("--resume", help="checkpoint folder (or URI) to resume from; read on the "
                   "driver and handed to the workers through the run's storage")
    p.add_argument("--max-failures", type=int,
                   help="worker/node failures recovered from the latest checkpoint (default 3; "
                   "-1 unlimited, 0 off)")
    add_transfer_args(p, prefix="")
    p.add_argument("--loss", dest="loss.name", choices=choices(TrainConfig, "loss.name"))
    p.add_argument("--class-weights", dest="loss.class_weights",
                   help="none | power:BETA | effective:BETA | w1,w2,...")
    p.add_argument("--focal-gamma", dest="loss.focal_gamma", type=float)
    p.add_argument("--tau", dest="loss.tau", type=float, help="logit adjustment strength")
    p.add_argument("--label-smoothing", dest="loss.label_smoothing", type=float)
    p.add_argument("--drw-epoch", dest="loss.drw_epoch", type=int,
                   help="deferred re-weighting: class weights from this epoch on")
    p.add_argument("--sampler", dest="sampler.strategy",
                   help="none | oversample | undersample | sqrt | p1,p2,...")
    p.add_argument("--mixup", dest="mix.mixup_alpha", type=float, metavar="ALPHA",
                   help="MixUp with Beta(ALPHA, ALPHA) mixing weights (torchvision v2); 0 = off")
    p.add_argument("--cutmix", dest="mix.cutmix_alpha", type=float, metavar="ALPHA",
                   help="CutMix with Beta(ALPHA, ALPHA) (with --mixup: one of the two per batch)")
    p.add_argument("--mix-partner", dest="mix.partner", choices=choices(TrainConfig, "mix.partner"),
                   help="second image: from the batch, or drawn class-balanced (Remix-style)")
    p.add_argument("--mix-prob", dest="mix.prob", type=float, help="share of batches mixed")
    p.add_argument("--optimizer", dest="optim.name", choices=choices(TrainConfig, "optim.name"))
    p.add_argument("--lr", dest="optim.lr", type=float)
    p.add_argument("--weight-decay", dest="optim.weight_decay", type=float)
    p.add_argument("--no-cache", dest="cache_decoded", action="store_false", default=None,
                   help="decode every epoch instead of caching decoded images")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    p.add_argument("--verbose", dest="ray_verbose", action="store_true",
                   help="show Ray's own INFO lines and progress bars on the console")
    return p


def _main(argv: list[str] | None) -> int:
    args = vars(get_args_parser().parse_args(argv))
    config_file, address = args.pop("config"), args.pop("address")
    configure_console(verbose=args.pop("ray_verbose"))
    overrides = {k.replace("-", "_"): v for k, v in args.items()}
    cfg = resolve_config(TrainConfig, config_file, overrides)
    storage.check_durable({"--out": cfg.out, "--storage-path": cfg.storage_path})
    check_train_config(cfg)  # weight/sampler vectors against the data, before Ray starts
    check_weights(cfg.model.weights)  # file/cache present: the weights error before Ray starts
    init_ray(address)
    results = run_training(cfg)
    print("\nTest split, best checkpoint (by val " + cfg.metric + "):")
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
