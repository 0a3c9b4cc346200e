"""Serving throughput and latency: requests/s, p50/p99 at concurrency 1 and 16, batching on/off.

    python benchmarks/serve_bench.py                       # random cnn bundle, 32x32 grey PNGs
    python benchmarks/serve_bench.py --model resnet18 --requests 500 --torch-threads 2
    python benchmarks/serve_bench.py --bundle bundles/digits-lt/v1 --requests 2000 \
        --out reports/serve_bench.json

Starts a local Ray instance and Serve on 127.0.0.1, deploys the app once per batching mode,
warms up, then sends ``--requests`` POST /v1/predict (one PNG each) per concurrency level from
a thread pool, timing each request end to end. Client and server share the machine, so on a
small box the numbers include the client's own CPU use.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", help="bundle dir (default: a random bundle, see --model)")
    p.add_argument("--model", default="cnn", help="architecture of the random bundle")
    p.add_argument("--image-size", type=int, default=32, help="side of the random bundle")
    p.add_argument("--requests", type=int, default=1000, help="per (mode, concurrency) cell")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--concurrency", default="1,16", help="comma-separated levels")
    p.add_argument("--batch-size", type=int, default=16, help="max_batch_size when batching")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--num-cpus", type=float, default=0.25, help="per replica")
    p.add_argument("--torch-threads", type=int, default=1, help="per replica")
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs for the Ray instance")
    p.add_argument("--out", default="serve_bench.json", help="results JSON path")
    return p


def _random_bundle(root: Path, model: str, size: int) -> Path:
    """A randomly initialised model (10 classes, grey ``size``²): speed ignores the weights."""
    import torch

    from imgpipe.bundle import save_bundle
    from imgpipe.data.transforms import Preprocess
    from imgpipe.models import create_model

    torch.manual_seed(0)
    net = create_model(model, 10, in_channels=1)
    return save_bundle(root, "bench", net.state_dict(),
                       architecture={"model": model, "num_classes": 10, "in_channels": 1},
                       preprocess=Preprocess(image_size=size),
                       class_names=[str(i) for i in range(10)],
                       train_class_counts=[500 // (i + 1) for i in range(10)])


def _pngs(n: int, size: int = 32) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def run_cell(url: str, images: list[bytes], requests: int, concurrency: int) -> dict[str, Any]:
    """Send ``requests`` single-image predictions with ``concurrency`` threads; time each."""
    import httpx

    with httpx.Client(base_url=url, timeout=60,
                      limits=httpx.Limits(max_connections=concurrency + 4)) as client:

        def one(i: int) -> tuple[float, int]:
            t0 = time.perf_counter()
            r = client.post("/v1/predict", content=images[i % len(images)],
                            headers={"Content-Type": "image/png"})
            return time.perf_counter() - t0, r.status_code

        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - start
    lat = np.array([r[0] for r in results]) * 1000
    errors = sum(1 for r in results if r[1] != 200)
    return {"concurrency": concurrency, "requests": requests, "errors": errors,
            "wall_s": round(wall, 3), "requests_per_s": round(requests / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def benchmark(args: argparse.Namespace, bundle: Path) -> list[dict[str, Any]]:
    """Every (batching mode, concurrency) cell against a freshly deployed app."""
    import ray
    from ray import serve

    from serving.app import build_app

    levels = [int(c) for c in args.concurrency.split(",")]
    images = _pngs(64, args.image_size)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for mode, batch in (("on", args.batch_size), ("off", 1)):
            serve.run(build_app({
                "bundle": str(bundle), "max_batch_size": batch,
                "batch_wait_timeout_s": args.batch_wait_ms / 1000, "num_cpus": args.num_cpus,
                "torch_threads": args.torch_threads,
                "max_ongoing_requests": max(32, 2 * max(levels))}), name="bench", route_prefix="/")
            run_cell(url, images, args.warmup, max(levels))
            for c in levels:
                row = {"batching": mode, "max_batch_size": batch,
                       **run_cell(url, images, args.requests, c)}
                print(_format_row(row), flush=True)
                rows.append(row)
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


HEADER = f"{'batching':>8} {'max_batch':>9} {'conc':>4} {'req/s':>8} {'p50 ms':>8} " \
         f"{'p99 ms':>8} {'errors':>6}"


def _format_row(r: dict[str, Any]) -> str:
    return (f"{r['batching']:>8} {r['max_batch_size']:>9} {r['concurrency']:>4} "
            f"{r['requests_per_s']:>8.1f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
            f"{r['errors']:>6}")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = (Path(args.bundle) if args.bundle
                  else _random_bundle(Path(tmp), args.model, args.image_size))
        print(HEADER, flush=True)
        rows = benchmark(args, bundle)
    print("\n" + HEADER + "\n" + "\n".join(_format_row(r) for r in rows))
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()},
              "bundle": args.bundle or f"random {args.model}, 10 classes, "
                                       f"{args.image_size}x{args.image_size} L",
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
