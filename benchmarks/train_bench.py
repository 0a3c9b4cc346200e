"""Fixed cost and steady epoch time of a train run: plain PyTorch vs imgpipe (1 and 2 workers).

    python benchmarks/train_bench.py                 # shapes-lt (2,448 train images), 4 epochs
    python benchmarks/train_bench.py --only plain 1  # a subset of the runs

Same shards, model (cnn), batch, optimizer, lr schedule, resampling and augmentation, one
thread per trainer. Each run is a fresh Python process, timed from outside: T(E) is what a user
pays for the whole run (interpreter start, imports, Ray start-up for imgpipe, training, the best
checkpoint scored on test, shutdown); the dataset is prepared once, before any run. Also the
steady epoch time (median of epochs 2..E) and the fixed overhead as the issue defines it,
T(E=4) − 3·epoch. For imgpipe runs also: the worker processes the Ray session started, and the
Train controller's start-up (its imports and set-up, from Ray's State API). Writes JSON.

Until 2026-12-01 every run shared the benchmark's process, which had imported torch for the
plain loop before the imgpipe runs: their T left out the torch import a ``jobs/train.py`` driver
pays when it scores the best checkpoint, and the plain loop's T left out its own imports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imgpipe.config import PrepareConfig, TrainConfig
from imgpipe.console import format_table

# torch (plain loop), Ray and the training code are imported by the run that needs them, in
# its own process (``--one``), so that each run pays for its own imports.


def run_plain(cfg: TrainConfig) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from plain import plain_train

    r = plain_train(cfg, world_size=1, score_splits=("val", "test"))
    return {"epoch_s": r["epoch_s"],
            "test_balanced_accuracy": r["scores"]["test"]["balanced_accuracy"]}


def run_imgpipe(cfg: TrainConfig, workers: int) -> dict:
    import ray

    from imgpipe.runtime import init_ray
    from imgpipe.training.trainer import run_training

    init_ray()
    res = run_training(cfg.model_copy(update={"num_workers": workers,
                                              "out": f"{cfg.out}/w{workers}"}))
    starts = process_starts()
    ray.shutdown()
    return {"epoch_s": [h["epoch_s"] for h in res["history"]],
            "test_balanced_accuracy": res["test"]["balanced_accuracy"], **starts}


def run_one(run: str, cfg_json: str, out: str) -> None:
    """The body of one run (``--one``), in this fresh process; its result goes to ``out``."""
    cfg = TrainConfig.model_validate_json(cfg_json)
    r = run_plain(cfg) if run == "plain" else run_imgpipe(cfg, int(run))
    Path(out).write_text(json.dumps(r))


def timed_run(run: str, cfg: TrainConfig, tmp: str) -> dict:
    """One run in a fresh process; ``total_s`` is its wall time measured from here."""
    out = Path(tmp) / f"run-{run}.json"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--one", run, "--config",
                           cfg.model_dump_json(), "--result", str(out)])
    total = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"run {run} failed (exit code {proc.returncode})")
    return {"total_s": total, **json.loads(out.read_text())}


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
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: the body of one run
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        run_one(args.one, args.config, args.result)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from imgpipe.data.prepare import prepare

        root = str(Path(tmp) / "shapes")
        prepare(PrepareConfig(dataset="shapes-lt", out=root, num_classes=args.num_classes,
                              images_per_class=args.images_per_class))
        cfg = TrainConfig.model_validate({
            "data": root, "out": str(Path(tmp) / "runs"), "epochs": args.epochs,
            "batch_size": args.batch_size, "cpus_per_worker": 0.45, "progress": False,
            # spelled out: the plain loop has no weights/data resolution of the input size
            "model": {"name": "cnn", "image_size": 32, "cifar_stem": True}})
        for run in args.only:
            r = timed_run(run, cfg, tmp)
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
