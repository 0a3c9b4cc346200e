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
from imgpipe.config import PrepareConfig
from imgpipe.config.cli import config_parser, parse_job_args
from imgpipe.constants import MANIFEST_FILE, SPLITS
from imgpipe.data.manifest import Manifest
from imgpipe.data.prepare import prepare, resolve_out
from imgpipe.errors import run_job

MAX_TABLE_ROWS = 100


def get_args_parser() -> argparse.ArgumentParser:
    # Only what the user typed overrides the YAML/config defaults (and, for own data, an
    # explicit --imbalance-ratio is what turns the long tail on).
    return config_parser(PrepareConfig, __doc__.split("\n")[0])


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
    cfg, _ = parse_job_args(PrepareConfig, get_args_parser(), argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = resolve_out(cfg)
    storage.check_durable({"--out": cfg.out})
    start = time.perf_counter()
    manifest = prepare(cfg)  # bad input data or settings raise UserError subclasses
    print(format_counts(manifest))
    print(f"({time.perf_counter() - start:.1f}s) manifest: "
          f"{storage.join(storage.absolute_location(cfg.out), MANIFEST_FILE)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_job(lambda: _main(argv), "prepare_data")


if __name__ == "__main__":
    sys.exit(main())
