"""Turn images into Parquet shards + manifest.json (the input of every other job).

    python jobs/prepare_data.py --dataset digits-lt --imbalance-ratio 100 --seed 0 --out data/digits-lt
    python jobs/prepare_data.py --image-folder PATH --out data/mine
    python jobs/prepare_data.py --manifest images.csv --out data/mine --config prepare.yaml

The result JSON is ``<out>/manifest.json``; a per-class table is printed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from imgpipe import storage
from imgpipe.config import EMBEDDED_DATASETS, PrepareConfig, resolve_config
from imgpipe.constants import MANIFEST_FILE, SPLITS
from imgpipe.data.prepare import prepare, resolve_out
from imgpipe.data.shards import Manifest, join_location
from imgpipe.errors import run_job

MAX_TABLE_ROWS = 100


def get_args_parser() -> argparse.ArgumentParser:
    # Every default is None so that only what the user typed overrides the YAML/config defaults
    # (and, for own data, an explicit --imbalance-ratio is what turns the long tail on).
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=EMBEDDED_DATASETS, help="embedded dataset")
    src.add_argument("--image-folder", help="class-per-folder tree (local path or s3:// gs://)")
    src.add_argument("--manifest", help="CSV/Parquet with columns path,label[,split]")
    p.add_argument("--out", help="output directory (local path or URI)")
    p.add_argument("--imbalance-ratio", type=float,
                   help="long-tail ratio rho >= 1 (own data: applied only when given)")
    p.add_argument("--seed", type=int)
    p.add_argument("--val-per-class", type=int, help="embedded data: balanced val size")
    p.add_argument("--test-per-class", type=int, help="embedded data: balanced test size")
    p.add_argument("--num-classes", type=int, help="shapes-lt: number of classes")
    p.add_argument("--images-per-class", type=int, help="shapes-lt: head class size")
    p.add_argument("--image-size", type=int, help="shapes-lt: image side in pixels")
    p.add_argument("--val-fraction", type=float, help="own data without val/: fraction per class")
    p.add_argument("--test-fraction", type=float, help="own data without test/: fraction per class")
    p.add_argument("--rows-per-shard", type=int)
    p.add_argument("--config", help="PrepareConfig YAML; command-line values override it")
    return p


def format_counts(manifest: Manifest) -> str:
    """Per-class table (class, train, val, test) plus totals and the skipped count."""
    splits = [s for s in SPLITS if s in manifest.counts]
    width = max(len("class"), *(len(n) for n in manifest.class_names[:MAX_TABLE_ROWS]))
    lines = [f"{'class':<{width}} " + " ".join(f"{s:>7}" for s in splits)]
    for name in manifest.class_names[:MAX_TABLE_ROWS]:
        lines.append(f"{name:<{width}} "
                     + " ".join(f"{manifest.counts[s][name]:>7}" for s in splits))
    if len(manifest.class_names) > MAX_TABLE_ROWS:
        lines.append(f"... {len(manifest.class_names) - MAX_TABLE_ROWS} more classes")
    lines.append(f"{'total':<{width}} " + " ".join(f"{manifest.num_rows[s]:>7}" for s in splits))
    lines.append(f"skipped: {manifest.skipped.count}")
    if manifest.ignored:
        lines.append("ignored: " + ", ".join(f"{n} {k}" for k, n in manifest.ignored.items()))
    lines += [f"warning: {w}" for w in manifest.warnings]
    return "\n".join(lines)


def _main(argv: list[str] | None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    cfg = resolve_out(resolve_config(PrepareConfig, args.config, overrides))
    storage.check_durable({"--out": cfg.out})
    start = time.perf_counter()
    manifest = prepare(cfg)  # bad input data or settings raise UserError subclasses
    print(format_counts(manifest))
    print(f"({time.perf_counter() - start:.1f}s) manifest: "
          f"{join_location(storage.absolute_location(cfg.out), MANIFEST_FILE)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(lambda: _main(argv), "prepare_data")


if __name__ == "__main__":
    sys.exit(main())
