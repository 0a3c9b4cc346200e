"""The shard format: ``<root>/<split>/part-NNNNN.parquet`` (the manifest: ``data.manifest``).

Columns: image (encoded bytes, as given), label (int64), label_name (string), id (string). Rows
are shuffled before writing so that every file and row group mixes classes: Ray Data hands whole
blocks to one worker, and a block holding a single class would starve the other ranks of it.
Works on local paths and on ``s3://`` / ``gs://`` (any ``pyarrow.fs`` URI).
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from imgpipe import storage
from imgpipe.constants import ID, IMAGE, LABEL, LABEL_NAME, MANIFEST_FILE
from imgpipe.data.manifest import (
    Manifest,
    ManifestError,
    build_manifest,
    detect_mode,
    load_manifest,
    save_manifest,
)
from imgpipe.errors import DataSourceError

SHARD_SCHEMA = pa.schema([
    pa.field(IMAGE, pa.binary()),
    pa.field(LABEL, pa.int64()),
    pa.field(LABEL_NAME, pa.string()),
    pa.field(ID, pa.string()),
])
_PART_RE = re.compile(r"part-\d{5}\.parquet")


def _to_table(records: list[dict]) -> pa.Table:
    return pa.table({
        IMAGE: pa.array([r[IMAGE] for r in records], pa.binary()),
        LABEL: pa.array([r[LABEL] for r in records], pa.int64()),
        LABEL_NAME: pa.array([r[LABEL_NAME] for r in records], pa.string()),
        ID: pa.array([r[ID] for r in records], pa.string()),
    }, schema=SHARD_SCHEMA)


def _clear_split_dir(fs: pafs.FileSystem, split_dir: str) -> None:
    """Remove part files a previous run left (only ours: ``part-NNNNN.parquet``)."""
    fs.create_dir(split_dir, recursive=True)
    for info in fs.get_file_info(pafs.FileSelector(split_dir, allow_not_found=True)):
        if info.type == pafs.FileType.File and _PART_RE.fullmatch(info.base_name):
            fs.delete_file(info.path)


def _write_split(fs: pafs.FileSystem, root: str, split: str, records: list[dict],
                 rows_per_shard: int, rng: np.random.Generator) -> list[str]:
    """Shuffle, then write ``rows_per_shard`` rows per file (one row group each)."""
    split_dir = posixpath.join(root, split)
    _clear_split_dir(fs, split_dir)
    order = rng.permutation(len(records))
    # An empty split still gets one (empty) file so that readers see the schema.
    chunks = [order[i:i + rows_per_shard] for i in range(0, len(order), rows_per_shard)] or [[]]
    files = []
    for k, chunk in enumerate(chunks):
        rel = f"{split}/part-{k:05d}.parquet"
        table = _to_table([records[i] for i in chunk])
        # Image bytes are already compressed (PNG/JPEG): compressing them again only costs CPU.
        pq.write_table(table, posixpath.join(root, rel), filesystem=fs,
                       row_group_size=max(rows_per_shard, 1),
                       compression={IMAGE: "NONE", LABEL: "SNAPPY", LABEL_NAME: "SNAPPY",
                                    ID: "SNAPPY"})
        files.append(rel)
    return files


def _check_records(records_by_split: dict[str, list[dict]], class_names: list[str]) -> None:
    seen: set[str] = set()
    for split, records in records_by_split.items():
        for rec in records:
            label = rec[LABEL]
            if not 0 <= label < len(class_names) or rec[LABEL_NAME] != class_names[label]:
                raise ValueError(f"{split} record {rec[ID]!r}: label {label} / "
                                 f"{rec[LABEL_NAME]!r} does not match class_names")
            if rec[ID] in seen:
                raise ValueError(f"duplicate id {rec[ID]!r} (ids must be unique across splits)")
            seen.add(rec[ID])


def write_shards(out: str, records_by_split: dict[str, list[dict]], class_names: list[str],
                 meta: dict[str, Any], *, rows_per_shard: int = 256) -> Manifest:
    """Write shuffled Parquet shards and ``manifest.json`` under ``out`` (local path or URI).

    ``meta`` keys: ``source`` (required), ``seed``, ``imbalance_ratio``, ``mode`` (detected from
    the image headers when absent), ``skipped`` (list of ``{"path"|"id", "reason"}``),
    ``skipped_count``, ``ignored`` (reason → count), ``warnings``, ``config``. The manifest is
    written last (and an old one is removed first), so a manifest always describes complete
    shards.

    Raises:
        ValueError: a label/label_name that does not match ``class_names``, or a duplicate id.
    """
    _check_records(records_by_split, class_names)
    fs, root = storage.resolve_fs(out, error=DataSourceError)
    fs.create_dir(root, recursive=True)
    manifest_path = posixpath.join(root, MANIFEST_FILE)
    if fs.get_file_info(manifest_path).type == pafs.FileType.File:
        fs.delete_file(manifest_path)
    seed = int(meta.get("seed", 0))
    mode = meta.get("mode") or detect_mode([r for rs in records_by_split.values() for r in rs])
    files = {}
    for i, (split, records) in enumerate(records_by_split.items()):
        rng = np.random.default_rng([seed, i, 0x5A4D])  # one stream per split, fixed by seed
        files[split] = _write_split(fs, root, split, records, rows_per_shard, rng)
    manifest = build_manifest(records_by_split, class_names, meta, files, mode)
    save_manifest(manifest, out)
    return manifest


def split_files(root: str, split: str, manifest: Manifest | None = None) -> list[str]:
    """Locations (local paths or URIs) of the Parquet files of ``split``, for Ray's read_parquet."""
    manifest = manifest or load_manifest(root)
    if split not in manifest.files:
        raise ManifestError(f"{root}: no split {split!r} (have {manifest.splits})")
    return [storage.join(root, *rel.split("/")) for rel in manifest.files[split]]


def split_rows(root: str, split: str, manifest: Manifest | None = None) -> int:
    """Rows of ``split`` on disk, from the Parquet footers only (no data is read).

    Raises:
        ManifestError: unknown split, or missing files / a row count that differs from the
            manifest (a partial or stale directory).
    """
    manifest = manifest or load_manifest(root)
    rows = sum(m.num_rows for m in _each_file(root, split, manifest, pq.read_metadata))
    _check_rows(root, split, rows, manifest.num_rows[split])
    return rows


def _each_file(root: str, split: str, manifest: Manifest, read) -> list:
    """``read(path, filesystem=fs)`` for each file of ``split``; a missing one is a ManifestError."""
    fs, path = storage.resolve_fs(root, error=DataSourceError)
    if split not in manifest.files:
        raise ManifestError(f"{root}: no split {split!r} (have {manifest.splits})")
    try:
        return [read(posixpath.join(path, rel), filesystem=fs) for rel in manifest.files[split]]
    except FileNotFoundError as e:
        raise ManifestError(f"{root}: a file the manifest lists is missing ({e}); "
                            "re-run prepare") from None


def _check_rows(root: str, split: str, on_disk: int, listed: int) -> None:
    if on_disk != listed:
        raise ManifestError(f"{root}: split {split!r} has {on_disk} rows on disk but the "
                            f"manifest says {listed}; re-run prepare")


def read_split_table(root: str, split: str) -> pa.Table:
    """All rows of one split as a pyarrow Table with the shard schema.

    Raises:
        ManifestError: unknown split, or missing files / a row count that differs from the
            manifest (a partial or stale directory).
    """
    manifest = load_manifest(root)
    tables = _each_file(root, split, manifest,
                        lambda f, filesystem: pq.read_table(f, filesystem=filesystem,
                                                            schema=SHARD_SCHEMA))
    table = pa.concat_tables(tables) if tables else SHARD_SCHEMA.empty_table()
    _check_rows(root, split, table.num_rows, manifest.num_rows[split])
    return table

