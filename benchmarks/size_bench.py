"""Input size for tiny images: accuracy and epoch cost of the same training at several sides.

    python benchmarks/size_bench.py                                  # digits-lt, 8/16/32 px
    python benchmarks/size_bench.py --sizes 16 32 --seeds 0 --recipes logit-adjusted

digits is 8×8; ``imgpipe.training.defaults`` decides what side a run trains at when the user
does not say. Each row trains the default ``cnn`` in-process (``benchmarks/plain.py``: same
decode, resampling, augmentation, optimizer and schedule as the train job, one process, no Ray)
with one of the tune job's warm-start recipes (``imgpipe.tuning.warm_start.RECIPES``), and
reports the test balanced accuracy of the epoch picked by val macro-F1 and the steady epoch
time. Prints the per-run table and a summary per (recipe, size) with the epoch time relative to
the largest size; writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain import DEFAULT_DATA, bench_data, plain_train  # noqa: E402

from imgpipe.config import TrainConfig, resolve_config  # noqa: E402
from imgpipe.console import format_table, write_json  # noqa: E402
from imgpipe.data.manifest import load_manifest  # noqa: E402
from imgpipe.tuning.space import params_to_overrides  # noqa: E402
from imgpipe.tuning.warm_start import RECIPES  # noqa: E402


def run(data: str, size: int, recipe: str, seed: int, epochs: int) -> dict:
    cfg = resolve_config(TrainConfig, None, {
        "data": data, "epochs": epochs, "seed": seed, "model.name": "cnn",
        "model.image_size": size, "model.cifar_stem": True,
        **params_to_overrides(RECIPES[recipe], len(load_manifest(data).class_names))})
    r = plain_train(cfg, world_size=1, score_splits=("val", "test"))
    steady = r["epoch_s"][1:] or r["epoch_s"]
    return {"recipe": recipe, "size": size, "seed": seed, "best_val_macro_f1": r["best_val"],
            "test_balanced_accuracy": r["scores"]["test"]["balanced_accuracy"],
            "steady_epoch_s": sum(steady) / len(steady)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="prepared shards (default: digits-lt)")
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--out", default="bench-results/size_bench.json")
    args = p.parse_args(argv)
    data = bench_data(args.data)
    runs = []
    for recipe in args.recipes:
        for size in args.sizes:
            for seed in args.seeds:
                runs.append(run(data, size, recipe, seed, args.epochs))
                r = runs[-1]
                print(f"{recipe} {size} px seed {seed}: test bal. acc "
                      f"{r['test_balanced_accuracy']:.3f}, epoch {r['steady_epoch_s']:.2f} s",
                      flush=True)
    rows = []
    for recipe in args.recipes:
        cost = {s: statistics.mean(r["steady_epoch_s"] for r in runs
                                   if r["recipe"] == recipe and r["size"] == s)
                for s in args.sizes}
        for size in args.sizes:
            accs = [r["test_balanced_accuracy"] for r in runs
                    if r["recipe"] == recipe and r["size"] == size]
            rows.append([recipe, size, ", ".join(f"{a:.3f}" for a in accs),
                         round(statistics.mean(accs), 3), round(cost[size], 2),
                         round(cost[size] / cost[max(args.sizes)], 2)])
    print(format_table(["recipe", "px", "test bal. acc per seed", "mean", "epoch s",
                        f"x {max(args.sizes)} px epoch"], rows))
    print(f"written {write_json(args.out, {'args': vars(args), 'runs': runs})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
