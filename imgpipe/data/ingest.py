"""The user's own images: a class-per-folder tree or a CSV/Parquet manifest → ``LabeledImages``.

Bytes are read through pyarrow filesystems (local, ``s3://``, ``gs://``), every image is decoded
once with the shared ``decode_image`` to prove it is usable, and stored as-is (no re-encode).
A file that cannot be read or decoded is skipped and reported, never fatal: one bad JPEG in
100k must not cost a night's run.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from imgpipe import storage
from imgpipe.constants import LABEL, SPLITS, TEST, TRAIN, VAL
from imgpipe.data.datasets import LabeledImages, Record, make_record
from imgpipe.data.decode import GREY_MODES, ImageDecodeError, decode_image, read_image_header
from imgpipe.data.sources import (  # noqa: F401 — listing names stay importable from here
    IMAGE_EXTENSIONS,
    SPLIT_ALIASES,
    SourceItem,
    SourceListing,
    list_image_folder,
    list_manifest,
    look_alike_classes,
    sort_class_names,
)
from imgpipe.data.splits import long_tail_keep, stratified_assign
from imgpipe.data.transforms import Preprocess
from imgpipe.errors import DataSourceError

log = logging.getLogger(__name__)

_IO_THREADS = 8  # object-store reads are latency-bound; threads overlap them


@dataclass
class _Loaded:
    item: SourceItem
    data: bytes | None = None
    mode: str | None = None
    error: str | None = None


# ---------------------------------------------------------------------------------------------
# reading and validating bytes
# ---------------------------------------------------------------------------------------------


class _FileSystems:
    """Filesystems by ``scheme://bucket``: making an S3 client per file would dominate the run."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[pafs.FileSystem, str]] = {}

    def resolve(self, location: str) -> tuple[pafs.FileSystem, str]:
        if "://" not in location:
            return storage.resolve_fs(location, error=DataSourceError)
        url = urlparse(location)
        key = f"{url.scheme}://{url.netloc}"
        if key not in self._cache:
            self._cache[key] = storage.resolve_fs(key + "/", error=DataSourceError)
        fs, base = self._cache[key]
        return fs, base.rstrip("/") + url.path


def _read_one(item: SourceItem, filesystems: _FileSystems) -> _Loaded:
    """Read the bytes and the header mode of one image; failures become a reason, not a raise."""
    try:
        if item.fs is not None:
            fs, path = item.fs, item.path
        else:
            fs, path = filesystems.resolve(item.location)
        with fs.open_input_stream(path) as f:
            data = f.read()
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
# splits (the draws themselves: data/splits.py)
# ---------------------------------------------------------------------------------------------


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


def _refuse_missing_classes(source: str, listing: SourceListing, loaded: list[_Loaded],
                            skipped: list[dict[str, str]]) -> None:
    """A class the user gave (a folder, or a label in the manifest) with no usable image is an
    error that names it and says why, never a class that silently disappears."""
    usable = {r.item.label_name for r in loaded}
    missing = [c for c in listing.classes if c not in usable]
    if not missing:
        return
    unreadable = Counter(it.label_name for it in listing.items)
    reasons = []
    for c in missing:
        why = []
        if unreadable[c]:
            why.append(f"{unreadable[c]} image(s), none decodable")
        if c in listing.not_images:
            exts = ", ".join(f"{n} {ext}" for ext, n in sorted(listing.not_images[c].items()))
            why.append(f"only files without an image extension ({exts})")
        reasons.append(f"{c!r} ({'; '.join(why) or 'empty folder'})")
    raise DataSourceError(
        f"{source}: class(es) with no usable image: {', '.join(reasons)}. Supported extensions: "
        f"{', '.join(IMAGE_EXTENSIONS)}. Add or convert images, or remove the class"
        + (f"; skipped files: {[s['path'] for s in skipped[:3]]}" if skipped else ""))


def _build(source: str, listing: SourceListing, *, seed: int, val_fraction: float,
           test_fraction: float, imbalance_ratio: float | None) -> LabeledImages:
    """Validate, split and (optionally) long-tail ``listing`` into ``LabeledImages``."""
    class_names = listing.classes
    if len(class_names) < 2:
        raise DataSourceError(f"{source}: found {len(class_names)} class ({class_names}); "
                              "a classifier needs at least 2")
    loaded, skipped, mode = load_images(listing.items)
    _refuse_missing_classes(source, listing, loaded, skipped)
    warnings = list(listing.warnings) + [
        f"class names that differ only in case, spacing or leading zeros: {group}"
        for group in look_alike_classes(class_names)]
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index[r.item.label_name] for r in loaded], dtype=np.int64)
    splits, small, notes = _assign_splits([r.item.split for r in loaded], labels, val_fraction,
                                          test_fraction, seed)
    warnings += notes
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
                         skipped=skipped, skipped_count=len(skipped), warnings=warnings,
                         ignored=dict(listing.ignored))


def ingest_image_folder(root: str, *, seed: int = 0, val_fraction: float = 0.1,
                        test_fraction: float = 0.2,
                        imbalance_ratio: float | None = None) -> LabeledImages:
    """A class-per-folder tree (local or URI) → ``LabeledImages`` with train/val/test.

    If ``root`` holds ``train/`` (and optionally ``val/``, ``test/``) those are the splits and a
    missing val/test is carved from train; otherwise every class is split per class with
    ``val_fraction`` / ``test_fraction``. ``imbalance_ratio=None`` (the default) keeps the natural
    class balance; a number subsamples train to that long tail. Unusable images are skipped.

    Raises:
        DataSourceError: no images, fewer than two classes, a class with no usable image, or
            an ambiguous tree.
    """
    return _build(f"image-folder:{canonical_location(root)}", list_image_folder(root), seed=seed,
                  val_fraction=val_fraction, test_fraction=test_fraction,
                  imbalance_ratio=imbalance_ratio)


def ingest_manifest(location: str, *, seed: int = 0, val_fraction: float = 0.1,
                    test_fraction: float = 0.2,
                    imbalance_ratio: float | None = None) -> LabeledImages:
    """A CSV/Parquet manifest (``path``, ``label``[, ``split``]) → ``LabeledImages``.

    Paths may be local or URIs; relative ones are relative to the manifest's folder. Rows without
    a split column are split like an image folder. Unusable images are skipped and reported.

    Raises:
        DataSourceError: missing columns, empty values, unknown split names, fewer than two
            classes, a label with no usable image.
    """
    return _build(f"manifest:{canonical_location(location)}", list_manifest(location), seed=seed,
                  val_fraction=val_fraction, test_fraction=test_fraction,
                  imbalance_ratio=imbalance_ratio)


def canonical_location(location: str) -> str:
    """Absolute local path, or the URI without a trailing slash (how sources are recorded)."""
    return location.rstrip("/") if "://" in location else os.path.abspath(location)
