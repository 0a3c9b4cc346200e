"""Search hyperparameters and class-imbalance handling with Ray Tune + Optuna; export the best.

    python jobs/tune.py                      # embedded digits-lt, prepared if missing
    python jobs/tune.py --data data/digits-lt --num-samples 16 --out runs/tune-1
    python jobs/tune.py --data data/mine --candidates bundles/a resnet50.IMAGENET1K_V2 --top-k 2
"""

from __future__ import annotations

import argparse
import sys

from imgpipe import storage
from imgpipe.config import EMBEDDED_DATASETS, TuneJobConfig, choices, resolve_config
from imgpipe.errors import run_job
from imgpipe.logs import configure_console
from imgpipe.models.weights import add_transfer_args, check_weights
from imgpipe.preflight import check_tune_config
from imgpipe.runtime import init_ray
from imgpipe.tuning.job import check_data_source, run_tune_job
from imgpipe.tuning.tuner import SearchInterrupted


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="YAML file (TuneJobConfig fields, `train:` and `search:`)")
    p.add_argument("--data", help="prepared shards (default data/digits-lt, prepared there if "
                   "missing); any other folder must hold a manifest.json")
    p.add_argument("--dataset", choices=EMBEDDED_DATASETS,
                   help="embedded dataset to prepare when --data has no shards")
    p.add_argument("--out", help="results.json, trials.csv, best checkpoint, report (local "
                   "folder or s3:// gs:// URI)")
    p.add_argument("--name", help="experiment name (resume finds it by this name)")
    p.add_argument("--bundle-root", help="where <name>/v<N> bundles are published (local "
                   "folder or s3:// gs:// URI)")
    p.add_argument("--bundle-name")
    p.add_argument("--num-samples", type=int, help="trials to run")
    p.add_argument("--max-concurrent", type=int, help="trials at once")
    p.add_argument("--time-budget-s", type=float, help="stop starting/continuing trials after this")
    p.add_argument("--workers-per-trial", type=int, help="Ray Train workers (DDP) per trial")
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--use-gpu", action="store_true", default=None)
    p.add_argument("--storage-path", help="Tune/Train storage: local path, s3://, gs://")
    p.add_argument("--seed", type=int, help="seeds the TPE sampler and every trial")
    p.add_argument("--metric", choices=choices(TuneJobConfig, "metric"), help="val objective")
    p.add_argument("--scheduler", choices=choices(TuneJobConfig, "scheduler"))
    p.add_argument("--epochs", type=int, help="max epochs per trial")
    p.add_argument("--grace-period", type=int, help="epochs before a trial may be stopped")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the experiment --name in --storage-path/--out")
    p.add_argument("--trial-max-failures", type=int,
                   help="retries of a failed trial from its latest checkpoint (default 2)")
    p.add_argument("--no-report", dest="report", action="store_false", default=None)
    add_transfer_args(p, prefix="train.")
    p.add_argument("--candidates", nargs="+", metavar="SPEC",
                   help="starting weights to choose from (any --weights form, ARCH=PATH, "
                   "random:ARCH): ranked by transferability first, then the search tries the "
                   "top --top-k (ranking in OUT/rank)")
    p.add_argument("--top-k", type=int, help="ranked candidates to search over (default 2)")
    p.add_argument("--rank-score", help="transferability score that ranks them (default logme_balanced)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    p.add_argument("--verbose", dest="ray_verbose", action="store_true",
                   help="show Ray's own INFO lines and progress bars on the console")
    return p


def _main(argv: list[str] | None) -> int:
    args = vars(get_args_parser().parse_args(argv))
    config_file, address = args.pop("config"), args.pop("address")
    configure_console(verbose=args.pop("ray_verbose"))
    tcfg = resolve_config(TuneJobConfig, config_file, args)
    storage.check_durable({"--out": tcfg.out, "--bundle-root": tcfg.bundle_root,
                           "--storage-path": tcfg.storage_path})
    check_data_source(tcfg)  # a folder without shards fails before Ray starts
    check_tune_config(tcfg)  # train/search vectors against the data's classes, before Ray
    model = tcfg.train.get("model") or {}
    check_weights(model.get("weights") or model.get("init_checkpoint"))  # before Ray starts
    init_ray(address)
    try:
        results = run_tune_job(tcfg)
    except SearchInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    print(f"\nwall time {results['wall_time_s']:.1f} s; results in {results['results_file']}, "
          f"bundle in {results['bundle']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(lambda: _main(argv), "tune")


if __name__ == "__main__":
    sys.exit(main())
