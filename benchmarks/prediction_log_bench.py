"""Serving throughput with the prediction log on vs off, side by side in one run.

    python benchmarks/prediction_log_bench.py --requests 1500 --rounds 3 \
        --out bench-results/prediction_log_bench.json

Deploys the same app (random cnn bundle or ``--bundle``, batching on) alternately without and
with ``prediction_log`` (embeddings on, sample rate 1), ``--rounds`` times each in the order
off, on, off, on, ... so drift in the shared machine's load hits both alike, and sends
``--requests`` single-image POST /v1/predict per round at ``--concurrency`` after a warm-up.
Reports requests/s per round and the ratio of medians (target: on ≥ 0.9 × off).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import load_cell, pngs, random_bundle, summarize  # noqa: E402

from imgpipe.runtime import free_port  # noqa: E402


def run_cell(url: str, images: list[bytes], requests: int, concurrency: int) -> dict:
    """``requests`` single-image POSTs at ``concurrency``: req/s, p50/p99 ms, errors."""
    return summarize([load_cell(url, images, requests, concurrency)], concurrency)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", help="bundle dir (default: a random cnn bundle, 32x32 grey)")
    p.add_argument("--requests", type=int, default=1500)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3, help="per mode")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--out", default="bench-results/prediction_log_bench.json")
    return p


def main(argv: list[str] | None = None) -> int:
    import ray
    from ray import serve

    from serving.app import build_app

    args = get_args_parser().parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="predlog-bench-"))
    bundle = Path(args.bundle) if args.bundle else random_bundle(tmp / "bundles", "cnn", 32)
    images = pngs(64, 32)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for r in range(args.rounds):
            for mode in ("off", "on"):
                log = {"location": str(tmp / f"log-{r}")} if mode == "on" else None
                serve.run(build_app({"bundle": str(bundle), "max_batch_size": 16,
                                     "num_cpus": 0.25, "max_ongoing_requests": 64,
                                     "prediction_log": log}), name="bench", route_prefix="/")
                run_cell(url, images, args.warmup, args.concurrency)
                row = {"round": r, "log": mode, **run_cell(url, images, args.requests,
                                                           args.concurrency)}
                print(f"round {r} log {mode:>3}: {row['requests_per_s']:8.1f} req/s  "
                      f"p50 {row['p50_ms']:.1f} ms  p99 {row['p99_ms']:.1f} ms  "
                      f"errors {row['errors']}", flush=True)
                rows.append(row)
            serve.delete("bench")
            time.sleep(1)
        written = sum(1 for p in tmp.glob("log-*/part-*.parquet"))
    finally:
        serve.shutdown()
        ray.shutdown()
    med = {m: float(np.median([r["requests_per_s"] for r in rows if r["log"] == m]))
           for m in ("off", "on")}
    ratio = med["on"] / med["off"]
    print(f"\nmedian req/s: log off {med['off']:.1f}, log on {med['on']:.1f} → ratio "
          f"{ratio:.3f} ({'within' if ratio >= 0.9 else 'NOT within'} 10 %); "
          f"{written} log files written")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "median_requests_per_s": med,
                                          "ratio_on_off": ratio, "log_files": written,
                                          "concurrency": args.concurrency,
                                          "requests": args.requests}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
