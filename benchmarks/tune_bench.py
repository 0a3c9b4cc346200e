"""Search efficiency: TPE (multivariate, group) + ASHA vs random search, same trial budget.

    python benchmarks/tune_bench.py                          # digits-lt, 16 trials, 2 seeds
    python benchmarks/tune_bench.py --seeds 0 1 2 --epochs 12

Both arms use imgpipe's search space (``define_space``: per-optimizer lr ranges, conditional
loss/weights/sampler) through Ray Tune + OptunaSearch, with the same trial budget; trials run
one at a time so the order is the search's own. To keep the benchmark about *the search* and
runnable on a laptop, a trial trains the same model/loop in-process (``benchmarks/plain.py``)
instead of starting a TorchTrainer per trial. Per seed:

* random: ``RandomSampler`` + FIFO (every trial runs all epochs); its best-of-N val macro-F1
  is the target;
* TPE+ASHA: the tune job's searcher (``tpe_searcher``: the standard long-tail recipes that fit
  the space first, then ``TPESampler(multivariate=True, group=True)``) + ASHA (grace 2,
  reduction 3); trial-epochs spent until some trial first reaches the target (trials in start
  order).

Prints the ratio TPE+ASHA trial-epochs / random trial-epochs (target ≤ 0.40); writes JSON.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain import DEFAULT_DATA, bench_data, iter_plain_epochs  # noqa: E402

from imgpipe.config import TrainConfig, resolve_config  # noqa: E402
from imgpipe.config.search import SearchSpace
from imgpipe.console import format_table, write_json  # noqa: E402
from imgpipe.data.manifest import load_manifest  # noqa: E402
from imgpipe.runtime import init_ray  # noqa: E402
from imgpipe.training.defaults import resolve_input_size  # noqa: E402
from imgpipe.tuning.space import define_space, params_to_overrides  # noqa: E402
from imgpipe.tuning.tuner import tpe_searcher  # noqa: E402

METRIC = "val_macro_f1"


def trial_fn(params: dict, data: str, epochs: int, seed: int) -> None:
    cfg = resolve_config(TrainConfig, None, {
        "data": data, "epochs": epochs, "seed": seed, "model.name": "cnn",
        **params_to_overrides(params, len(load_manifest(data).class_names))})
    cfg, _ = resolve_input_size(cfg, load_manifest(data))  # the train job's own input size rule
    for e in iter_plain_epochs(cfg, world_size=1):
        tune.report({METRIC: e["scores"]["val"]["macro_f1"]})


def run_arm(arm: str, data: str, trials: int, epochs: int, seed: int, storage: str) -> list:
    """Each trial's per-epoch val macro-F1, in trial start order."""
    k = len(load_manifest(data).class_names)
    if arm == "random":
        searcher = OptunaSearch(space=partial(define_space, space=SearchSpace(), num_classes=k),
                                metric=METRIC, mode="max",
                                sampler=optuna.samplers.RandomSampler(seed=seed))
    else:  # the tune job's own searcher: warm-started, grouped multivariate TPE
        searcher = tpe_searcher(SearchSpace(), k, metric=METRIC, mode="max", seed=seed,
                                num_samples=trials)
    scheduler = (FIFOScheduler() if arm == "random" else
                 ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=2,
                               reduction_factor=3))
    tuner = tune.Tuner(
        tune.with_resources(partial(trial_fn, data=data, epochs=epochs, seed=seed), {"CPU": 1}),
        tune_config=tune.TuneConfig(metric=METRIC, mode="max", search_alg=searcher,
                                    scheduler=scheduler, num_samples=trials,
                                    max_concurrent_trials=1),
        run_config=tune.RunConfig(name=f"{arm}-{seed}", storage_path=storage, verbose=0))
    grid = tuner.fit()
    curves = []
    for r in grid:  # one trial at a time: creation order is the search's order
        df = r.metrics_dataframe
        curves.append([] if df is None or METRIC not in df else df[METRIC].tolist())
    return curves


def epochs_to_reach(curves: list[list[float]], target: float) -> int | None:
    spent = 0
    for curve in curves:
        for value in curve:
            spent += 1
            if value >= target - 1e-12:
                return spent
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="prepared shards (default: digits-lt)")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--epochs", type=int, default=8, help="max epochs per trial")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--storage", default="bench-results/tune_bench_runs")
    p.add_argument("--out", default="bench-results/tune_bench.json")
    args = p.parse_args(argv)
    data = bench_data(args.data)
    init_ray()
    storage = str(Path(args.storage).resolve())
    rows, runs = [], []
    for seed in args.seeds:
        rand = run_arm("random", data, args.trials, args.epochs, seed, storage)
        tpe = run_arm("tpe-asha", data, args.trials, args.epochs, seed, storage)
        if not any(rand) or not any(tpe):
            raise SystemExit("every trial of an arm failed: see the Tune errors above")
        target = max(max(c) for c in rand if c)
        rand_cost = sum(len(c) for c in rand)
        need = epochs_to_reach(tpe, target)
        tpe_best = max(max(c) for c in tpe if c)
        ratio = need / rand_cost if need is not None else None
        rows.append([seed, round(target, 4), rand_cost, round(tpe_best, 4),
                     sum(len(c) for c in tpe), need if need is not None else "not reached",
                     round(ratio, 2) if ratio is not None else ""])
        runs.append({"seed": seed, "random_curves": rand, "tpe_asha_curves": tpe,
                     "target": target, "random_trial_epochs": rand_cost,
                     "tpe_asha_trial_epochs_to_target": need, "ratio": ratio})
    print(format_table(["seed", "random best-of-N", "random trial-epochs", "TPE+ASHA best",
                        "TPE+ASHA trial-epochs", "to reach random's best", "ratio"], rows))
    reached = [r["ratio"] for r in runs if r["ratio"] is not None]
    print(f"reached random's best in {len(reached)}/{len(runs)} seeds; mean ratio "
          f"{sum(reached) / len(reached):.2f}" if reached else "never reached random's best")
    print(f"written {write_json(args.out, {'args': vars(args), 'runs': runs})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
