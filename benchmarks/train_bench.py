"""Fixed cost and steady epoch time of a train run: plain PyTorch vs imgpipe (1 and 2 workers).

    python benchmarks/train_bench.py                 # shapes-lt (2,448 train images), 4 epochs
    python benchmarks/train_bench.py --only plain 1  # a subset of the runs

Same shards, model (cnn), batch, optimizer, lr schedule, resampling and augmentation, one
thread per trainer. For each run: total wall time T(E) of the whole run (start → best
checkpoint evaluated on test), the steady epoch time (median of epochs 2..E), and the fixed
overhead as the issue defines it, T(E=4) − 3·epoch. imgpipe's T includes Ray start-up
(``init_ray``) when it starts Ray itself, like a user's ``jobs/train.py`` run. For imgpipe
runs also: the worker processes the Ray session started, and the Train controller's start-up
(its imports and set-up, from Ray's State API). Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain import plain_train  # noqa: E402

from imgpipe.config import PrepareConfig, TrainConfig  # noqa: E402
from imgpipe.console import format_table  # noqa: E402
from imgpipe.data.prepare import prepare  # noqa: E402
from imgpipe.runtime import init_ray  # noqa: E402
from imgpipe.training.trainer import run_training  # noqa: E402


def run_plain(cfg: TrainConfig) -> dict:
    t = time.perf_counter()
    r = plain_train(cfg, world_size=1, score_splits=("val", "test"))
    return {"total_s": time.perf_counter() - t, "epoch_s": r["epoch_s"],
            "test_balanced_accuracy": r["scores"]["test"]["balanced_accuracy"]}


def run_imgpipe(cfg: TrainConfig, workers: int) -> dict:
    t = time.perf_counter()
    init_ray()
    res = run_training(cfg.model_copy(update={"num_workers": workers,
                                              "out": f"{cfg.out}/w{workers}"}))
    total = time.perf_counter() - t
    starts = process_starts()
    ray.shutdown()  # the next run pays its own start-up, like a fresh job
    return {"total_s": total, "epoch_s": [h["epoch_s"] for h in res["history"]],
            "test_balanced_accuracy": res["test"]["balanced_accuracy"], **starts}


def process_starts() -> dict:
    """Worker processes this Ray session started, and the Train controller's own start-up:
    from its process launch to the launch of the first actor it creates (its placement-group
    cleaner), i.e. its imports and set-up. From Ray's State API (pids joined to launch times)."""
    from ray.util.state import list_actors, list_workers

    workers = [w for w in list_workers(limit=10_000, detail=True, raise_on_missing_output=False)
               if w.worker_type == "WORKER"]
    launched = {w.pid: w.worker_launch_time_ms for w in workers}
    first = {}
    for a in list_actors(limit=10_000, raise_on_missing_output=False):
        if a.pid in launched:
            first.setdefault(a.class_name, launched[a.pid])
    ctl, cleaner = first.get("TrainController"), first.get("PlacementGroupCleaner")
    return {"worker_processes": len(workers),
            "controller_startup_s": (cleaner - ctl) / 1000 if ctl and cleaner else None,
            "actor_classes": sorted(first)}


def summarise(name: str, r: dict, epochs: int) -> dict:
    steady = statistics.median(r["epoch_s"][1:] or r["epoch_s"])
    return {"run": name, "total_s": r["total_s"], "steady_epoch_s": steady,
            "fixed_overhead_s": r["total_s"] - (epochs - 1) * steady,
            "test_balanced_accuracy": r["test_balanced_accuracy"],
            **{k: r.get(k) for k in ("worker_processes", "controller_startup_s",
                                     "actor_classes")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--images-per-class", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--only", nargs="+", default=["plain", "1", "2"],
                   help="runs: plain and/or imgpipe worker counts")
    p.add_argument("--out", default="bench-results/train_bench.json")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = str(Path(tmp) / "shapes")
        prepare(PrepareConfig(dataset="shapes-lt", out=root, num_classes=args.num_classes,
                              images_per_class=args.images_per_class))
        cfg = TrainConfig.model_validate({
            "data": root, "out": str(Path(tmp) / "runs"), "epochs": args.epochs,
            "batch_size": args.batch_size, "cpus_per_worker": 0.45, "progress": False,
            # spelled out: the plain loop has no weights/data resolution of the input size
            "model": {"name": "cnn", "image_size": 32, "cifar_stem": True}})
        for run in args.only:
            r = run_plain(cfg) if run == "plain" else run_imgpipe(cfg, int(run))
            name = "plain PyTorch" if run == "plain" else f"imgpipe {run} worker(s)"
            rows.append(summarise(name, r, args.epochs) | {"epoch_s": r["epoch_s"]})
            print(f"{name}: total {r['total_s']:.1f} s", flush=True)
    plain = next((r for r in rows if r["run"] == "plain PyTorch"), None)
    for r in rows:
        r["steady_epoch_ratio"] = r["steady_epoch_s"] / plain["steady_epoch_s"] if plain else None
    print(format_table(
        ["run", f"T(E={args.epochs}) s", "steady epoch s", "x plain epoch", "fixed overhead s",
         "test bal. acc", "processes", "controller start s"],
        [[r["run"], round(r["total_s"], 1), round(r["steady_epoch_s"], 2),
          round(r["steady_epoch_ratio"], 2) if r["steady_epoch_ratio"] else "",
          round(r["fixed_overhead_s"], 1), round(r["test_balanced_accuracy"], 3),
          r["worker_processes"] if r["worker_processes"] is not None else "",
          round(r["controller_startup_s"], 1) if r["controller_startup_s"] else ""]
         for r in rows]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "runs": rows}, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
