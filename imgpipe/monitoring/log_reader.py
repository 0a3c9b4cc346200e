"""Read a window of the prediction log: newest part files first, bad files skipped and counted.

A window is a duration (``30m``, ``1h``, ``2d``: rows served since now minus that) or a row
count (``500``: the newest N rows). Files that cannot be read as Parquet or lack the required
columns (a crashed writer, a half-uploaded object, someone else's file) are skipped with their
reason; rows from another model (name/version) than the bundle's are left out and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from imgpipe import storage
from imgpipe.config.specs import Window
from imgpipe.errors import DataSourceError
from imgpipe.prediction_log_format import (
    EMBEDDING,
    ENTROPY,
    MARGIN,
    MODEL_NAME,
    MODEL_VERSION,
    PREDICTED_INDEX,
    PROBABILITIES,
    REQUIRED_COLUMNS,
    SERVED_PROBABILITY,
    TEMPERATURE,
    TIME,
    part_time,
)


@dataclass
class LogWindow:
    """Rows of one window, oldest first. ``probabilities (N, C)`` calibrated;
    ``embeddings (N, D)`` float32 or None when the log has none."""

    times: np.ndarray  # datetime64[us] UTC
    predicted: np.ndarray  # (N,) served decision index
    probabilities: np.ndarray
    served_probability: np.ndarray
    margin: np.ndarray
    entropy: np.ndarray
    embeddings: np.ndarray | None
    files_read: int = 0
    files_skipped: list[dict[str, str]] = field(default_factory=list)
    other_model_rows: int = 0
    table: pa.Table | None = None  # the rows as read (for the active-learning queue)
    # (N,) the T each row's probabilities were logged at; None for logs written before the
    # column existed (their rows are taken to be at the reference's T)
    temperatures: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.predicted)


def list_parts(location: str) -> tuple[pafs.FileSystem, list[tuple[datetime, str]]]:
    """(filesystem, [(time in name, path)]) of the log's part files, newest first."""
    fs, root = storage.resolve_fs(location)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    parts = [(t, i.path) for i in infos
             if i.type == pafs.FileType.File and (t := part_time(i.base_name)) is not None]
    return fs, sorted(parts, reverse=True)


def _read_part(fs: pafs.FileSystem, path: str) -> pa.Table:
    table = pq.read_table(path, filesystem=fs)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DataSourceError(f"missing columns {missing}")
    return table


def read_window(location: str, window: Window, model_name: str, model_version: str,
                num_classes: int, now: datetime | None = None) -> LogWindow:
    """The window's rows of ``model_name`` v``model_version`` (see the module docstring).

    Raises:
        FileNotFoundError: the log location does not exist or holds no part files.
    """
    fs, parts = list_parts(location)
    if not parts:
        raise DataSourceError(f"{location}: no prediction log files (part-*.parquet)")
    now = now or datetime.now(timezone.utc)
    since = now - window.duration if window.duration else None
    tables, skipped, other, rows = [], [], 0, 0
    for when, path in parts:
        if since is not None and when < since:
            break  # a file is named when written: older names hold only older rows
        try:
            t = _read_part(fs, path)
        except Exception as e:  # corrupt, truncated, foreign: skip it, never crash
            skipped.append({"file": path, "reason": f"{type(e).__name__}: {e}"[:300]})
            continue
        mine = _same_model(t, model_name, model_version)
        other += t.num_rows - len(mine)
        t = t.take(pa.array(mine)) if len(mine) < t.num_rows else t
        tables.append(t)
        rows += t.num_rows
        if window.rows is not None and rows >= window.rows:
            break
    return _to_window(tables, since, window.rows, num_classes, len(tables), skipped, other)


def _same_model(t: pa.Table, name: str, version: str) -> np.ndarray:
    if MODEL_NAME not in t.column_names or MODEL_VERSION not in t.column_names:
        return np.ones(t.num_rows, dtype=bool)
    names = np.asarray(t[MODEL_NAME].to_pylist(), dtype=object)
    versions = np.asarray(t[MODEL_VERSION].to_pylist(), dtype=object)
    return np.flatnonzero((names == name) & (versions == str(version)))


def _to_window(tables: list[pa.Table], since: datetime | None, last_rows: int | None,
               num_classes: int, files_read: int, skipped: list[dict[str, str]],
               other: int) -> LogWindow:
    keep = [t.select([c for c in t.column_names]) for t in tables]
    table = pa.concat_tables(keep, promote_options="permissive") if keep else None
    if table is not None:
        table = table.sort_by(TIME)
        if since is not None:
            times = table[TIME].cast(pa.int64()).to_numpy()
            cutoff = int(since.timestamp() * 1_000_000)
            table = table.slice(int(np.searchsorted(times, cutoff)))
        if last_rows is not None and table.num_rows > last_rows:
            table = table.slice(table.num_rows - last_rows)
        probs = table[PROBABILITIES].to_pylist()
        bad = [i for i, p in enumerate(probs) if p is None or len(p) != num_classes]
        if bad:
            good = np.setdiff1d(np.arange(table.num_rows), bad)
            table = table.take(pa.array(good))
            probs = [probs[i] for i in good]
            skipped.append({"file": "(rows)", "reason": f"{len(bad)} rows with a probability "
                            f"vector not of length {num_classes}"})
    if table is None or table.num_rows == 0:
        empty = np.zeros(0)
        return LogWindow(empty.astype("datetime64[us]"), empty.astype(np.int64),
                         np.zeros((0, num_classes)), empty, empty, empty, None, files_read,
                         skipped, other, table)
    emb = None
    if EMBEDDING in table.column_names and table[EMBEDDING].null_count == 0:
        emb = np.asarray(table[EMBEDDING].to_pylist(), dtype=np.float32)
    served = (table[SERVED_PROBABILITY].to_numpy(zero_copy_only=False)
              if SERVED_PROBABILITY in table.column_names else np.full(table.num_rows, np.nan))
    temps = None
    if TEMPERATURE in table.column_names and table[TEMPERATURE].null_count == 0:
        temps = table[TEMPERATURE].to_numpy(zero_copy_only=False).astype(np.float64)
    return LogWindow(
        table[TIME].to_numpy(zero_copy_only=False).astype("datetime64[us]"),
        table[PREDICTED_INDEX].to_numpy(zero_copy_only=False).astype(np.int64),
        np.asarray(probs, dtype=np.float64), served.astype(np.float64),
        table[MARGIN].to_numpy(zero_copy_only=False).astype(np.float64),
        table[ENTROPY].to_numpy(zero_copy_only=False).astype(np.float64),
        emb, files_read, skipped, other, table, temps)
