"""Serving throughput and latency: the imgpipe Serve app vs a plain FastAPI server, side by side.

    python benchmarks/serve_bench.py                              # cnn and resnet18, shipped defaults
    python benchmarks/serve_bench.py --models cnn --requests 600 --out reports/serve_bench.json
    python benchmarks/serve_bench.py --set min_replicas=1 --set max_batch_size=1   # try a setting
    python benchmarks/serve_bench.py --ingress proxy     # Serve's Python proxy instead of HAProxy

For each model, ONE run starts both servers over the same random bundle (10 classes, grey
32x32; speed ignores the weights): the imgpipe app exactly as ``jobs/serve.py`` starts it with
``serving/config.yaml`` (the shipped defaults, HAProxy ingress unless ``--ingress proxy``),
and ``benchmarks/plain_server.py`` (one sync FastAPI handler calling the same ``Predictor``
under uvicorn). Each (concurrency) cell runs
``--rounds`` times per server, the two servers alternating, so machine noise hits both alike.
The load comes from a separate process (asyncio + aiohttp, closed loop: ``concurrency``
requests in flight, one PNG each, POST /v1/predict). The machine is shared by client and
servers, so the ratio matters more than the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from imgpipe.runtime import free_port
from serving.ingress import INGRESS_CHOICES, use_ingress

REPO = Path(__file__).resolve().parents[1]
SERVERS = ("imgpipe", "plain")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="cnn,resnet18", help="architectures of the random bundles")
    p.add_argument("--image-size", type=int, default=32, help="bundle input side (cifar stem)")
    p.add_argument("--requests", default="cnn=1500,resnet18=400",
                   help="requests per cell per round: N, or model=N,...")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    p.add_argument("--rounds", type=int, default=2, help="alternations per cell and server")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--config", default=str(REPO / "serving" / "config.yaml"),
                   help="Serve config giving the imgpipe app's settings (the shipped defaults)")
    p.add_argument("--ingress", choices=INGRESS_CHOICES, default="haproxy",
                   help="the Ray instance's HTTP ingress (serving/ingress.py; jobs/serve.py's "
                        "default is haproxy)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one ServeArgs field (YAML value), e.g. min_replicas=1")
    p.add_argument("--out", default="serve_bench.json", help="results JSON path")
    return p


# ----- inputs --------------------------------------------------------------------------------


def random_bundle(root: Path, model: str, size: int) -> Path:
    import torch

    from imgpipe.bundle import save_bundle
    from imgpipe.data.transforms import Preprocess
    from imgpipe.models import create_model

    torch.manual_seed(0)
    net = create_model(model, 10, in_channels=1)
    return save_bundle(root / model, "bench", net.state_dict(),
                       architecture={"model": model, "num_classes": 10, "in_channels": 1},
                       preprocess=Preprocess(image_size=size),
                       class_names=[str(i) for i in range(10)],
                       train_class_counts=[500 // (i + 1) for i in range(10)])


def pngs(n: int, size: int) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


# ----- load generator (runs in its own process) ----------------------------------------------


async def _load(url: str, images: list[bytes], requests: int, concurrency: int) -> dict:
    import aiohttp

    latencies: list[float] = []
    statuses: list[int] = []
    counter = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            for i in counter:
                t0 = time.perf_counter()
                try:
                    async with session.post(f"{url}/v1/predict", data=images[i % len(images)],
                                            headers={"Content-Type": "image/png"}) as r:
                        await r.read()
                        statuses.append(r.status)
                except aiohttp.ClientError:
                    statuses.append(599)
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {"latencies": latencies, "statuses": statuses, "wall_s": wall}


def load_cell(url: str, images: list[bytes], requests: int, concurrency: int) -> dict:
    return asyncio.run(_load(url, images, requests, concurrency))


def summarize(parts: list[dict], concurrency: int) -> dict[str, Any]:
    lat = np.concatenate([p["latencies"] for p in parts]) * 1000
    statuses = [s for p in parts for s in p["statuses"]]
    n, wall = len(statuses), sum(p["wall_s"] for p in parts)
    return {"concurrency": concurrency, "requests": n,
            "errors": sum(1 for s in statuses if s != 200),
            "requests_per_s": round(n / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2)}


# ----- servers -------------------------------------------------------------------------------


def wait_ready(url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s}s")


def start_plain(bundle: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "plain_server.py"),
                             str(bundle), str(port)], env=env)


def wait_plain(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"{url}/openapi.json", timeout=5)
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"plain server at {url} did not start")


def imgpipe_args(config: str, bundle: Path, overrides: list[str]):
    import yaml

    from serving.runner import resolve_serve_args

    extra = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)}
    args, _ = resolve_serve_args(config, {**extra, "bundle": str(bundle)})
    return args


# ----- the run -------------------------------------------------------------------------------


def bench_model(args: argparse.Namespace, model: str, root: Path, pool: ProcessPoolExecutor,
                serve_port: int) -> list[dict[str, Any]]:
    from ray import serve

    from serving.runner import start_app

    bundle = random_bundle(root, model, args.image_size)
    serve_args = imgpipe_args(args.config, bundle, args.set)
    images = pngs(64, args.image_size)
    # One Serve instance (one proxy, one port) for every model: restarting Serve between
    # models only adds a proxy start-up, which a loaded machine can time out.
    urls = {"imgpipe": f"http://127.0.0.1:{serve_port}", "plain": f"http://127.0.0.1:{free_port()}"}
    plain = start_plain(bundle, int(urls["plain"].rsplit(":", 1)[1]))
    try:
        start_app(serve_args, "127.0.0.1", int(urls["imgpipe"].rsplit(":", 1)[1]), "bench")
        wait_ready(urls["imgpipe"])
        wait_plain(urls["plain"], plain)
        levels = [int(c) for c in args.concurrency.split(",")]
        n = requests_for(args.requests, model)
        for name in SERVERS:
            pool.submit(load_cell, urls[name], images, args.warmup, max(levels)).result()
        rows = []
        for c in levels:
            parts: dict[str, list[dict]] = {name: [] for name in SERVERS}
            for r in range(args.rounds):
                order = SERVERS if r % 2 == 0 else SERVERS[::-1]
                for name in order:
                    reqs = n if c > 1 else max(50, n // 4)
                    parts[name].append(pool.submit(load_cell, urls[name], images, reqs, c).result())
            cell = {name: summarize(parts[name], c) for name in SERVERS}
            row = {"model": model, "concurrency": c, **cell,
                   "ratio_req_s": round(cell["imgpipe"]["requests_per_s"]
                                        / cell["plain"]["requests_per_s"], 2)}
            print(format_row(row), flush=True)
            rows.append(row)
        return rows
    finally:
        serve.delete("bench")
        plain.terminate()
        plain.wait(30)


def requests_for(spec: str, model: str) -> int:
    if "=" not in spec:
        return int(spec)
    table = dict(part.split("=") for part in spec.split(","))
    return int(table.get(model, next(iter(table.values()))))


HEADER = (f"{'model':>9} {'conc':>4} | {'imgpipe req/s':>13} {'p50':>7} {'p99':>7} {'err':>4} | "
          f"{'plain req/s':>11} {'p50':>7} {'p99':>7} {'err':>4} | {'ratio':>5}")


def format_row(r: dict[str, Any]) -> str:
    a, b = r["imgpipe"], r["plain"]
    return (f"{r['model']:>9} {r['concurrency']:>4} | {a['requests_per_s']:>13.1f} "
            f"{a['p50_ms']:>7.1f} {a['p99_ms']:>7.1f} {a['errors']:>4} | "
            f"{b['requests_per_s']:>11.1f} {b['p50_ms']:>7.1f} {b['p99_ms']:>7.1f} "
            f"{b['errors']:>4} | {r['ratio_req_s']:>5.2f}")


def start_ray(attempts: int = 3) -> None:
    """``ray.init`` as jobs/serve.py calls it, retried: on a heavily loaded machine the raylet
    gives up when its dashboard agent takes over ~15 s to start ("node timed out during
    startup"), which says nothing about serving speed."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(configure_logging=False)
            return
        except Exception as e:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            print(f"ray.init failed ({e}); retrying", flush=True)
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    import ray

    args = get_args_parser().parse_args(argv)
    rows: list[dict[str, Any]] = []
    # As jobs/serve.py does: a local Ray instance with Ray's defaults (all cores), started
    # with the ingress settings in its environment.
    use_ingress(args.ingress)
    start_ray()
    try:
        ctx = multiprocessing.get_context("spawn")
        serve_port = free_port()
        with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(1, ctx) as pool:
            print(HEADER, flush=True)
            for model in args.models.split(","):
                rows += bench_model(args, model, Path(tmp), pool, serve_port)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    print("\nlatencies in ms; ratio = imgpipe req/s / plain req/s\n" + HEADER)
    print("\n".join(format_row(r) for r in rows))
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()},
              "settings": {**{k: v for k, v in vars(args).items() if k != "out"}},
              "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r[s]["errors"] == 0 for r in rows for s in SERVERS) else 1


if __name__ == "__main__":
    raise SystemExit(main())
