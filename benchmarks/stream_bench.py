"""Ray Data stream throughput: decode once (cached in the object store) vs decode every epoch.

    python benchmarks/stream_bench.py --num-classes 20 --images-per-class 1000 --epochs 3

Prepares shapes-lt shards (synthetic, seeded) in a temp folder, builds the training stream the
train job uses (resampling + augmentation), iterates it for several epochs on the driver, and
prints rows/s per epoch for both modes plus the object-store bytes the cache pins. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from imgpipe.config import PrepareConfig
from imgpipe.console import format_table
from imgpipe.constants import LABEL, TRAIN
from imgpipe.data.pipeline import (
    StreamPlan,
    build_decoded,
    build_train_stream,
    set_epoch,
    start_epoch_clock,
)
from imgpipe.data.prepare import prepare
from imgpipe.data.rebalance import sampling_rates
from imgpipe.data.transforms import Augment
from imgpipe.runtime import init_ray
from imgpipe.training.trainer import quiet_data_progress


def run_mode(root: str, cache: bool, epochs: int, strategy: str, image_size: int) -> dict:
    from imgpipe.data.shards import load_manifest

    manifest = load_manifest(root)
    pre = manifest.preprocess(image_size)
    t0 = time.perf_counter()
    decoded, _ = build_decoded(root, TRAIN, pre, cache=cache)
    setup_s = time.perf_counter() - t0
    stored = decoded.size_bytes() if cache else 0
    rates = sampling_rates(manifest.counts_vector(TRAIN), strategy)
    name, clock = start_epoch_clock()
    stream = build_train_stream(decoded, StreamPlan(tuple(rates), 0, name, Augment(), pre))
    per_epoch = []
    try:
        for epoch in range(epochs):
            set_epoch(name, epoch)
            t = time.perf_counter()
            rows = sum(len(b[LABEL]) for b in stream.iter_batches(batch_size=256,
                                                                  batch_format="numpy"))
            per_epoch.append({"epoch": epoch, "rows": rows, "s": time.perf_counter() - t})
    finally:
        ray.kill(clock)
    return {"cache": cache, "setup_s": setup_s, "object_store_bytes": stored,
            "epochs": per_epoch}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-classes", type=int, default=20)
    p.add_argument("--images-per-class", type=int, default=1000)
    p.add_argument("--imbalance-ratio", type=float, default=10)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--sampler", default="sqrt")
    p.add_argument("--out", default="bench-results/stream_bench.json")
    args = p.parse_args(argv)
    init_ray()
    quiet_data_progress()
    with tempfile.TemporaryDirectory() as tmp:
        root = str(Path(tmp) / "shapes")
        prepare(PrepareConfig(dataset="shapes-lt", out=root, num_classes=args.num_classes,
                              images_per_class=args.images_per_class,
                              imbalance_ratio=args.imbalance_ratio, image_size=args.image_size))
        results = [run_mode(root, cache, args.epochs, args.sampler, args.image_size)
                   for cache in (True, False)]
    rows = []
    for r in results:
        for e in r["epochs"]:
            rows.append(["decode once" if r["cache"] else "decode each epoch", e["epoch"],
                         e["rows"], round(e["rows"] / e["s"], 1), round(e["s"], 2)])
    print(format_table(["mode", "epoch", "rows", "rows/s", "seconds"], rows))
    for r in results:
        mean = float(np.mean([e["rows"] / e["s"] for e in r["epochs"][1:] or r["epochs"]]))
        print(f"{'decode once' if r['cache'] else 'decode each epoch'}: setup "
              f"{r['setup_s']:.1f} s, object store {r['object_store_bytes'] / 2**20:.1f} MiB, "
              f"steady {mean:.0f} rows/s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
