"""Training-stream throughput: imgpipe's Ray Data stream vs a torch DataLoader, side by side.

    python benchmarks/stream_bench.py                       # shapes-lt, 20 classes, 3 epochs
    python benchmarks/stream_bench.py --epochs 2 --images-per-class 300   # quicker

Both read the same shards, decode once into memory (Ray: the object store), resample with the
same per-class rates (default: oversample to the head count) and augment with the same
transforms (crop padding 2, rotation 10°), on the same cores:

* ``ray-stream`` — the train job's stream (cached decode → resample + batch-level augment in
  Ray Data map tasks), iterated with ``iter_torch_batches`` like a train worker;
* ``dataloader`` — decoded arrays in memory, ``WeightedRandomSampler`` with the same per-class
  rates and epoch size, torchvision v2 per-image augmentation, 2 worker processes;
* ``dataloader-batched`` — the same DataLoader augmenting whole batches with imgpipe's
  batch-level augmentation in ``collate_fn`` (isolates the augmentation from the stream).

Prints rows/s per epoch, the steady rows/s (epochs after the first) and the ratios; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain import load_split  # noqa: E402

from imgpipe.config import (
    Augment,  # noqa: E402
    PrepareConfig,  # noqa: E402
)
from imgpipe.console import format_table  # noqa: E402
from imgpipe.constants import LABEL, PIXELS, TRAIN  # noqa: E402
from imgpipe.data.augment import augment_batch  # noqa: E402
from imgpipe.data.manifest import load_manifest  # noqa: E402
from imgpipe.data.pipeline import (  # noqa: E402
    StreamPlan,
    build_decoded,
    build_train_stream,
)
from imgpipe.data.prepare import prepare  # noqa: E402
from imgpipe.data.rebalance import sampling_rates  # noqa: E402
from imgpipe.data.transforms import create_train_augment  # noqa: E402
from imgpipe.runtime import init_ray  # noqa: E402
from imgpipe.training.trainer import quiet_data_progress  # noqa: E402


def ray_stream(root: str, pre, rates: np.ndarray, aug: Augment, epochs: int, batch: int,
               block_rows: int) -> list[dict]:
    # consumed here, on the driver: decode in the job's env too, so the stream reuses its workers
    decoded, _ = build_decoded(root, TRAIN, pre, cache=True, runtime_env={})
    # as a one-worker train run streams: each epoch's stream built with the epoch in its plan
    plan = StreamPlan(tuple(rates), 0, None, aug, pre)
    out = []
    for epoch in range(epochs):
        stream = build_train_stream(decoded, replace(plan, epoch=epoch), block_rows=block_rows)
        t, rows = time.perf_counter(), 0
        for b in stream.iter_torch_batches(batch_size=batch, local_shuffle_buffer_size=batch,
                                           dtypes={PIXELS: torch.uint8, LABEL: torch.int64}):
            rows += len(b[LABEL])
        out.append({"epoch": epoch, "rows": rows, "s": time.perf_counter() - t})
    return out


class InMemory(Dataset):
    def __init__(self, pixels: np.ndarray, labels: np.ndarray, transform=None) -> None:
        self.x = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # uint8 NCHW
        self.y = torch.from_numpy(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = self.x[i]
        return (self.transform(x) if self.transform else x), self.y[i]


class BatchAugment:
    """collate_fn: stack, then imgpipe's batch-level augmentation (picklable for workers)."""

    def __init__(self, aug: Augment, pre) -> None:
        self.aug, self.pre = aug, pre

    def __call__(self, items):
        x = torch.stack([i[0] for i in items]).permute(0, 2, 3, 1).numpy()
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        x = augment_batch(x, self.aug, self.pre, gen)
        return torch.from_numpy(x), torch.stack([i[1] for i in items])


def dataloader(root: str, pre, rates: np.ndarray, aug: Augment, epochs: int, batch: int,
               workers: int, batched: bool) -> list[dict]:
    split = load_split(root, TRAIN, pre)  # decode once into memory
    weights = torch.as_tensor(rates[split.labels], dtype=torch.double)
    epoch_rows = int(round(float(weights.sum())))
    ds = InMemory(split.pixels, split.labels, None if batched else create_train_augment(aug, pre))
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, persistent_workers=True,
                        sampler=WeightedRandomSampler(weights, epoch_rows, replacement=True,
                                                      generator=torch.Generator().manual_seed(0)),
                        collate_fn=BatchAugment(aug, pre) if batched else None)
    out = []
    for epoch in range(epochs):
        t, rows = time.perf_counter(), 0
        for _, y in loader:
            rows += len(y)
        out.append({"epoch": epoch, "rows": rows, "s": time.perf_counter() - t})
    return out


def steady(epochs: list[dict]) -> float:
    tail = epochs[1:] or epochs
    return sum(e["rows"] for e in tail) / sum(e["s"] for e in tail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-classes", type=int, default=20)
    p.add_argument("--images-per-class", type=int, default=1000)
    p.add_argument("--imbalance-ratio", type=float, default=10)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--sampler", default="oversample")
    p.add_argument("--block-rows", type=int, nargs="+", default=[64, 512],
                   help="rows per resample/augment map task (one ray-stream run each)")
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--out", default="bench-results/stream_bench.json")
    args = p.parse_args(argv)
    init_ray()
    quiet_data_progress()
    torch.set_num_threads(1)
    aug = Augment()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = str(Path(tmp) / "shapes")
        prepare(PrepareConfig(dataset="shapes-lt", out=root, num_classes=args.num_classes,
                              images_per_class=args.images_per_class,
                              imbalance_ratio=args.imbalance_ratio, image_size=args.image_size))
        manifest = load_manifest(root)
        pre = manifest.preprocess(args.image_size)
        rates = sampling_rates(manifest.counts_vector(TRAIN), args.sampler)
        for br in args.block_rows:
            results[f"ray-stream (block {br})"] = ray_stream(root, pre, rates, aug, args.epochs,
                                                             args.batch_size, br)
        for batched in (False, True):
            name = "dataloader-batched" if batched else "dataloader"
            results[name] = dataloader(root, pre, rates, aug, args.epochs, args.batch_size,
                                       args.loader_workers, batched)
    base = steady(results["dataloader"])
    rows = [[name, e["epoch"], e["rows"], round(e["rows"] / e["s"]), round(e["s"], 2)]
            for name, eps in results.items() for e in eps]
    print(format_table(["pipeline", "epoch", "rows", "rows/s", "seconds"], rows))
    summary = [[name, round(steady(eps)), round(steady(eps) / base, 2)]
               for name, eps in results.items()]
    print()
    print(format_table(["pipeline", "steady rows/s", "x dataloader"], summary))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "epochs": results,
                               "steady_rows_per_s": {n: steady(e) for n, e in results.items()},
                               "ratio_vs_dataloader": {n: steady(e) / base
                                                       for n, e in results.items()}}, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
