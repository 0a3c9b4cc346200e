"""The user's own images: a class-per-folder tree or a CSV/Parquet manifest → ``LabeledImages``.

Bytes are read through pyarrow filesystems (local, ``s3://``, ``gs://``), every image is decoded
once with the shared ``decode_image`` to prove it is usable, and stored as-is (no re-encode).
A file that cannot be read or decoded is skipped and reported, never fatal: one bad JPEG in
100k must not cost a night's run.
"""

from __future__ import annotations

import logging
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from imgpipe.constants import LABEL, SPLITS, TEST, TRAIN, VAL
from imgpipe.data.datasets import LabeledImages, Record, long_tail_counts, make_record
from imgpipe.data.decode import GREY_MODES, ImageDecodeError, decode_image, read_image_header
from imgpipe.data.shards import join_location, read_bytes, resolve_filesystem
from imgpipe.data.transforms import Preprocess

log = logging.getLogger(__name__)

# torchvision's ImageFolder list, lower-case; anything else in the tree is ignored, not skipped.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
                    ".gif")
SPLIT_ALIASES = {"train": TRAIN, "val": VAL, "valid": VAL, "validation": VAL, "test": TEST}
_IO_THREADS = 8  # object-store reads are latency-bound; threads overlap them


@dataclass
class SourceItem:
    """One image to ingest: where it is, its class name, its split if the source fixes one."""

    location: str  # local path or URI, as reported in skip messages
    label_name: str
    split: str | None
    id: str
    fs: pafs.FileSystem | None = None  # known already for folder trees
    path: str | None = None


@dataclass
class _Loaded:
    item: SourceItem
    data: bytes | None = None
    mode: str | None = None
    error: str | None = None


# ---------------------------------------------------------------------------------------------
# listing sources
# ---------------------------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_folder(root: str) -> tuple[list[SourceItem], list[str]]:
    """``root/<class>/**/<image>`` or ``root/{train,val,test}/<class>/**/<image>`` → items.

    Returns the items and warnings (ignored files). Raises ValueError for a missing root, a tree
    with no images, or a ``train/`` folder next to folders that are not splits.
    """
    fs, base = resolve_filesystem(root)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        raise ValueError(f"image_folder: {root} is not a directory")
    infos = [i for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
             if i.type == pafs.FileType.File]
    rel = {i.path: posixpath.relpath(i.path, base).split("/") for i in infos}
    tops = {parts[0] for parts in rel.values() if len(parts) > 1 and not parts[0].startswith(".")}
    split_mode = TRAIN in tops
    if split_mode and not tops <= set(SPLIT_ALIASES):
        others = sorted(tops - set(SPLIT_ALIASES))
        raise ValueError(f"image_folder: {root} holds train/ and also {others}; put class "
                         "folders inside train/ (and val/, test/), or drop train/")
    depth = 3 if split_mode else 2  # split?/class/file
    items, ignored = [], 0
    for path, parts in sorted(rel.items()):
        if len(parts) < depth or not _is_image(parts[-1]) or any(p.startswith(".") for p in parts):
            ignored += 1
            continue
        split = SPLIT_ALIASES[parts[0]] if split_mode else None
        label = parts[1] if split_mode else parts[0]
        items.append(SourceItem(join_location(root, *parts), label, split, "/".join(parts),
                                fs=fs, path=path))
    if not items:
        raise ValueError(f"image_folder: no images under {root} (expected <class>/<image> with "
                         f"extensions {', '.join(IMAGE_EXTENSIONS)})")
    warnings = [f"ignored {ignored} file(s) that are not <class>/<image> images"] if ignored else []
    return items, warnings


def _read_manifest_table(location: str) -> pa.Table:
    fs, path = resolve_filesystem(location)
    lower = path.lower()
    types = {"path": pa.string(), "label": pa.string(), "split": pa.string()}
    if lower.endswith(".csv"):
        with fs.open_input_stream(path) as f:
            return pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(column_types=types))
    if lower.endswith((".parquet", ".pq")):
        table = pq.read_table(path, filesystem=fs)
        return table.cast(pa.schema([pa.field(n, types.get(n, table.schema.field(n).type))
                                     for n in table.column_names]))
    raise ValueError(f"manifest: {location} must end in .csv or .parquet")


def _resolve_row_path(manifest_location: str, path: str) -> str:
    """Relative paths are relative to the manifest's folder (local or URI)."""
    if "://" in path or (os.path.isabs(path) and "://" not in manifest_location):
        return path
    if "://" in manifest_location:
        return posixpath.join(posixpath.dirname(manifest_location), path)
    return os.path.join(os.path.dirname(os.path.abspath(manifest_location)), path)


def list_manifest(location: str) -> tuple[list[SourceItem], list[str]]:
    """A CSV/Parquet manifest with columns ``path``, ``label`` (class name), optional ``split``.

    Raises ValueError naming the column or row that is wrong (missing column, empty value,
    unknown split name).
    """
    try:
        table = _read_manifest_table(location)
    except FileNotFoundError:
        raise ValueError(f"manifest: {location} not found") from None
    missing = [c for c in ("path", "label") if c not in table.column_names]
    if missing:
        raise ValueError(f"manifest: {location} lacks column(s) {missing} "
                         f"(found {table.column_names})")
    paths, labels = table["path"].to_pylist(), table["label"].to_pylist()
    splits = table["split"].to_pylist() if "split" in table.column_names else [None] * len(paths)
    splits = [s.strip().lower() if s and s.strip() else None for s in splits]
    if any(s is not None for s in splits) and any(s is None for s in splits):
        raise ValueError(f"manifest: {location}: column split is empty on some rows; "
                         "fill it on every row or drop the column")
    items, duplicates, seen = [], [], set()
    for row, (path, label, split) in enumerate(zip(paths, labels, splits, strict=True), start=2):
        if not path or label is None or not str(label).strip():
            raise ValueError(f"manifest: {location} row {row}: empty path or label")
        if split is not None and split not in SPLIT_ALIASES:
            raise ValueError(f"manifest: {location} row {row}: unknown split {split!r} "
                             f"(use {', '.join(SPLITS)})")
        if path in seen:
            duplicates.append(f"row {row}: {path}")
            continue
        seen.add(path)
        items.append(SourceItem(_resolve_row_path(location, path), str(label).strip(),
                                SPLIT_ALIASES[split] if split else None, path))
    if not items:
        raise ValueError(f"manifest: {location} has no rows")
    warnings = [f"ignored {len(duplicates)} duplicate path(s), e.g. {duplicates[:3]}"
                ] if duplicates else []
    return items, warnings


# ---------------------------------------------------------------------------------------------
# reading and validating bytes
# ---------------------------------------------------------------------------------------------


class _FileSystems:
    """Filesystems by ``scheme://bucket``: making an S3 client per file would dominate the run."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[pafs.FileSystem, str]] = {}

    def resolve(self, location: str) -> tuple[pafs.FileSystem, str]:
        if "://" not in location:
            return resolve_filesystem(location)
        url = urlparse(location)
        key = f"{url.scheme}://{url.netloc}"
        if key not in self._cache:
            self._cache[key] = resolve_filesystem(key + "/")
        fs, base = self._cache[key]
        return fs, base.rstrip("/") + url.path


def _read_one(item: SourceItem, filesystems: _FileSystems) -> _Loaded:
    """Read the bytes and the header mode of one image; failures become a reason, not a raise."""
    try:
        if item.fs is not None:
            fs, path = item.fs, item.path
        else:
            fs, path = filesystems.resolve(item.location)
        data = read_bytes(fs, path)
    except (OSError, pa.ArrowException, ValueError) as e:
        return _Loaded(item, error=f"cannot read file: {e}")
    try:
        _, _, mode = read_image_header(data)
    except ImageDecodeError as e:
        return _Loaded(item, error=str(e))
    return _Loaded(item, data=data, mode=mode)


def _validate_one(loaded: _Loaded, pre: Preprocess) -> _Loaded:
    """Decode fully with the shared decoder: truncation shows only when pixels are loaded."""
    try:
        decode_image(loaded.data, pre)
    except ImageDecodeError as e:
        return _Loaded(loaded.item, error=str(e))
    return loaded


def load_images(items: list[SourceItem]) -> tuple[list[_Loaded], list[dict[str, str]], str]:
    """Read and validate every item → (usable images, skipped ``{path, reason}``, mode).

    The mode is "L" when every readable image is greyscale, else "RGB"; each image is then
    decoded in that mode, exactly as training will decode it.
    """
    filesystems = _FileSystems()
    with ThreadPoolExecutor(max_workers=_IO_THREADS) as pool:
        read = list(pool.map(lambda it: _read_one(it, filesystems), items))
        ok = [r for r in read if r.error is None]
        mode = "L" if ok and all(r.mode in GREY_MODES for r in ok) else "RGB"
        # image_size only matters for the resize after decoding; small keeps validation cheap.
        pre = Preprocess(image_size=8, mode=mode, mean=(0.5,) * (1 if mode == "L" else 3),
                         std=(0.5,) * (1 if mode == "L" else 3))
        checked = list(pool.map(lambda r: _validate_one(r, pre), ok))
    bad = [r for r in read if r.error is not None] + [r for r in checked if r.error is not None]
    skipped = [{"path": r.item.location, "reason": r.error} for r in bad]
    for s in skipped[:5]:
        log.warning("skipping %s: %s", s["path"], s["reason"])
    if len(skipped) > 5:
        log.warning("... and %d more unusable image(s)", len(skipped) - 5)
    return [r for r in checked if r.error is None], skipped, mode


# ---------------------------------------------------------------------------------------------
# splits and long tail
# ---------------------------------------------------------------------------------------------


def sort_class_names(names: set[str]) -> list[str]:
    """Numeric order when every name is an integer ("2" before "10"), else lexicographic."""
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def stratified_assign(labels: np.ndarray, fractions: dict[str, float],
                      seed: int) -> tuple[np.ndarray, list[int]]:
    """Assign rows to splits per class: ``round(n * f)`` (at least 1) to each split, rest train.

    Per-class allocation (rather than sklearn's ``train_test_split(stratify=...)``, which only
    approximates per-class proportions and may give a rare class no val/test row at all) puts
    every splittable class in every split, so per-class recall exists. Classes with fewer than
    ``len(fractions) + 1`` rows stay wholly in train; their labels are returned.
    """
    out = np.full(len(labels), TRAIN, dtype=object)
    rng = np.random.default_rng(seed)
    small = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < len(fractions) + 1:
            small.append(int(c))
            continue
        take = [max(1, round(len(idx) * f)) for f in fractions.values()]
        while sum(take) > len(idx) - 1:  # keep at least one training row
            take[int(np.argmax(take))] -= 1
        start = 0
        for split, k in zip(fractions, take, strict=True):
            out[idx[start:start + k]] = split
            start += k
    return out, small


def long_tail_keep(labels: np.ndarray, imbalance_ratio: float, seed: int) -> np.ndarray:
    """Boolean mask that subsamples ``labels`` (train rows) to a long tail with ratio ``rho``.

    Classes are ranked by their own size (the natural head stays the head) and ``n_max`` is the
    largest head count every rank can supply, so as few rows as possible are dropped.
    """
    counts = np.bincount(labels)
    ranked = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0]
    keep = np.zeros(len(labels), dtype=bool)
    if len(ranked) < 2:
        keep[:] = True
        return keep
    n_max = min(counts[c] * imbalance_ratio ** (r / (len(ranked) - 1))
                for r, c in enumerate(ranked))
    quotas = long_tail_counts(max(1, int(n_max)), len(ranked), imbalance_ratio)
    rng = np.random.default_rng([seed, 0x7A11])
    for c, q in zip(ranked, quotas, strict=True):
        keep[rng.permutation(np.flatnonzero(labels == c))[:q]] = True
    return keep


def _assign_splits(given: list[str | None], labels: np.ndarray, val_fraction: float,
                   test_fraction: float, seed: int) -> tuple[np.ndarray, list[int], list[str]]:
    """Given splits are kept; missing val/test are carved from train, stratified and seeded."""
    splits = np.array([g if g is not None else TRAIN for g in given], dtype=object)
    if all(g is None for g in given):
        carve = {TEST: test_fraction, VAL: val_fraction}
    else:
        carve = {s: f for s, f in ((TEST, test_fraction), (VAL, val_fraction)) if s not in given}
    if not carve:
        return splits, [], []
    train = np.flatnonzero(splits == TRAIN)
    assigned, small = stratified_assign(labels[train], carve, seed)
    splits[train] = assigned
    notes = [] if all(g is None for g in given) else [
        f"no {s} split given: carved {f:.0%} of each train class" for s, f in carve.items()]
    return splits, small, notes


# ---------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------


def _build(source: str, items: list[SourceItem], warnings: list[str], *, seed: int,
           val_fraction: float, test_fraction: float,
           imbalance_ratio: float | None) -> LabeledImages:
    """Validate, split and (optionally) long-tail ``items`` into ``LabeledImages``."""
    class_names = sort_class_names({it.label_name for it in items})
    if len(class_names) < 2:
        raise ValueError(f"{source}: found {len(class_names)} class ({class_names}); "
                         "a classifier needs at least 2")
    loaded, skipped, mode = load_images(items)
    if not loaded:
        raise ValueError(f"{source}: none of the {len(items)} image(s) could be decoded, e.g. "
                         f"{skipped[0]['path']}: {skipped[0]['reason']}")
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index[r.item.label_name] for r in loaded], dtype=np.int64)
    splits, small, notes = _assign_splits([r.item.split for r in loaded], labels, val_fraction,
                                          test_fraction, seed)
    warnings = warnings + notes
    if small:
        warnings.append(f"too few images to split, all kept in train: "
                        f"{[class_names[c] for c in small]}")
    keep = np.ones(len(loaded), dtype=bool)
    if imbalance_ratio is not None:
        train = np.flatnonzero(splits == TRAIN)
        keep[train] = long_tail_keep(labels[train], imbalance_ratio, seed)
    records: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for r, label, split, k in zip(loaded, labels, splits, keep, strict=True):
        if k:
            records[split].append(make_record(r.data, int(label), class_names, r.item.id))
    for split, recs in records.items():
        counts = np.bincount([rec[LABEL] for rec in recs], minlength=len(class_names))
        if (counts == 0).any():
            absent = [n for n, c in zip(class_names, counts, strict=True) if c == 0]
            warnings.append(f"no {split} images for classes {absent}")
    for w in warnings:
        log.warning("%s: %s", source, w)
    return LabeledImages(source, class_names, records, mode, seed, imbalance_ratio,
                         skipped=skipped, skipped_count=len(skipped), warnings=warnings)


def ingest_image_folder(root: str, *, seed: int = 0, val_fraction: float = 0.1,
                        test_fraction: float = 0.2,
                        imbalance_ratio: float | None = None) -> LabeledImages:
    """A class-per-folder tree (local or URI) → ``LabeledImages`` with train/val/test.

    If ``root`` holds ``train/`` (and optionally ``val/``, ``test/``) those are the splits and a
    missing val/test is carved from train; otherwise every class is split per class with
    ``val_fraction`` / ``test_fraction``. ``imbalance_ratio=None`` (the default) keeps the natural
    class balance; a number subsamples train to that long tail. Unusable images are skipped.

    Raises:
        ValueError: no images, fewer than two classes, or an ambiguous tree.
    """
    items, warnings = list_image_folder(root)
    return _build(f"image-folder:{canonical_location(root)}", items, warnings, seed=seed,
                  val_fraction=val_fraction, test_fraction=test_fraction,
                  imbalance_ratio=imbalance_ratio)


def ingest_manifest(location: str, *, seed: int = 0, val_fraction: float = 0.1,
                    test_fraction: float = 0.2,
                    imbalance_ratio: float | None = None) -> LabeledImages:
    """A CSV/Parquet manifest (``path``, ``label``[, ``split``]) → ``LabeledImages``.

    Paths may be local or URIs; relative ones are relative to the manifest's folder. Rows without
    a split column are split like an image folder. Unusable images are skipped and reported.

    Raises:
        ValueError: missing columns, empty values, unknown split names, fewer than two classes.
    """
    items, warnings = list_manifest(location)
    return _build(f"manifest:{canonical_location(location)}", items, warnings, seed=seed,
                  val_fraction=val_fraction, test_fraction=test_fraction,
                  imbalance_ratio=imbalance_ratio)


def canonical_location(location: str) -> str:
    """Absolute local path, or the URI without a trailing slash (how sources are recorded)."""
    return location.rstrip("/") if "://" in location else os.path.abspath(location)
