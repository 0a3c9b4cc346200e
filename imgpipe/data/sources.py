"""Listing the user's images: a class-per-folder tree or a CSV/Parquet manifest → ``SourceItem``s.

What is *not* an image of a class is decided here, once for folders and manifests:

- OS and notebook debris (:func:`is_debris`: ``__MACOSX``, ``.ipynb_checkpoints``, ``.DS_Store``,
  AppleDouble ``._*`` files, ``Thumbs.db``, ``desktop.ini``, any hidden file or folder, …) is
  ignored at every depth, in split layouts and manifests alike, and counted.
- Other files without an image extension are ignored and counted per class, so a class whose
  folder holds only e.g. ``.heic`` files can be named in the error that refuses it.

Class order (it fixes label indices in every bundle) is :func:`sort_class_names`: a total order
over any strings that depends on nothing but the names.
"""

from __future__ import annotations

import os
import posixpath
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from imgpipe import storage
from imgpipe.constants import SPLITS, TEST, TRAIN, VAL
from imgpipe.data.decode import IMAGE_FORMATS
from imgpipe.errors import DataSourceError

# torchvision's ImageFolder list plus every extension Pillow registers for the formats the
# decoder opens (.jfif, .jpe, .pnm, ...), lower-case; anything else is ignored and counted.
IMAGE_EXTENSIONS = tuple(sorted(
    {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
    | {ext for ext, fmt in Image.registered_extensions().items() if fmt in IMAGE_FORMATS}))
# Split folder names, compared case-insensitively ("Train/", "VAL/" are splits too).
SPLIT_ALIASES = {"train": TRAIN, "training": TRAIN, "val": VAL, "valid": VAL,
                 "validation": VAL, "dev": VAL, "test": TEST, "testing": TEST}
# Folders and files that operating systems, archivers and notebooks leave behind (compared
# case-insensitively; every name starting with "." is debris too).
DEBRIS_NAMES = frozenset({
    "__macosx", "thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini", "$recycle.bin",
    "system volume information", "@eadir", "lost+found", "__pycache__", "icon\r",
})
_ASCII_INTEGER = re.compile(r"-?[0-9]+")


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
class SourceListing:
    """The items of a source plus what was left out of it and why."""

    items: list[SourceItem]
    classes: list[str]  # every class the user gave (folder or label), usable images or not
    warnings: list[str] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)  # reason → count
    not_images: dict[str, Counter] = field(default_factory=dict)  # class → extension counts


def is_debris(name: str) -> bool:
    """Whether a path component is OS/notebook debris (hidden names included)."""
    return name.startswith(".") or name.lower() in DEBRIS_NAMES


def class_name(name: str) -> str:
    """A class name as stored: Unicode NFC, so a folder unzipped on macOS (NFD) and the same
    folder made on Linux give the same name, order and label index."""
    return unicodedata.normalize("NFC", name)


def sort_class_names(names: set[str] | list[str]) -> list[str]:
    """The class order: numeric when every name is an ASCII integer ("2" before "10"; "01"
    before "1" when both exist), else Unicode code-point order (Python's ``sorted``: no locale).

    A total order that depends only on the names: the same on every machine and under every
    ``PYTHONHASHSEED``.
    """
    unique = set(names)
    if unique and all(_ASCII_INTEGER.fullmatch(n) for n in unique):
        return sorted(unique, key=lambda n: (int(n), n))
    return sorted(unique)


def look_alike_classes(names: list[str]) -> list[list[str]]:
    """Groups of distinct class names that differ only in case, width, leading zeros or outer
    spaces (``1``/``01``, ``Cat``/``cat``): usually one class the user spelled two ways."""
    def key(n: str) -> str:
        k = unicodedata.normalize("NFKC", n).strip().casefold()
        return str(int(k)) if _ASCII_INTEGER.fullmatch(k) else k
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(key(n), []).append(n)
    return [sort_class_names(g) for g in groups.values() if len(g) > 1]


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _extension(name: str) -> str:
    return os.path.splitext(name)[1].lower() or "(none)"


def list_image_folder(root: str) -> SourceListing:
    """``root/<class>/**/<image>`` or ``root/{train,val,test}/<class>/**/<image>`` → items.

    Raises DataSourceError for a missing root, a tree with no images, or a ``train/`` folder next to
    folders that are not splits (debris folders such as ``__MACOSX`` do not count).
    """
    fs, base = storage.resolve_fs(root)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        raise DataSourceError(f"image_folder: {root} is not a directory")
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    rel = {i.path: posixpath.relpath(i.path, base).split("/") for i in infos}
    is_file = {i.path: i.type == pafs.FileType.File for i in infos}
    debris = {p for p, parts in rel.items() if any(is_debris(x) for x in parts)}
    tops = {parts[0] for p, parts in rel.items() if p not in debris and not is_file[p]}
    split_mode = any(SPLIT_ALIASES.get(t.lower()) == TRAIN for t in tops)
    if split_mode and not all(t.lower() in SPLIT_ALIASES for t in tops):
        others = sorted(t for t in tops if t.lower() not in SPLIT_ALIASES)
        raise DataSourceError(f"image_folder: {root} holds train/ and also {others}; put "
                              "class folders inside train/ (and val/, test/), or drop train/")
    depth = 3 if split_mode else 2  # split?/class/file
    listing = SourceListing([], [], ignored=Counter())
    classes: set[str] = set()
    for path, parts in sorted(rel.items()):
        if path in debris:
            listing.ignored["os_debris"] += is_file[path]
            continue
        if len(parts) >= depth - 1 and (len(parts) > depth - 1 or not is_file[path]):
            classes.add(class_name(parts[depth - 2]))  # a class folder, even an empty one
        if not is_file[path]:
            continue
        if len(parts) < depth:
            listing.ignored["outside_class_folders"] += 1
            continue
        label = class_name(parts[depth - 2])
        if not _is_image_name(parts[-1]):
            listing.ignored["not_an_image"] += 1
            listing.not_images.setdefault(label, Counter())[_extension(parts[-1])] += 1
            continue
        split = SPLIT_ALIASES[parts[0].lower()] if split_mode else None
        listing.items.append(SourceItem(storage.join(root, *parts), label, split,
                                        "/".join(parts), fs=fs, path=path))
    listing.classes = sort_class_names(classes)
    if not listing.items:
        raise DataSourceError(f"image_folder: no images under {root} (expected "
                              f"<class>/<image> with extensions {', '.join(IMAGE_EXTENSIONS)})")
    listing.ignored = dict(listing.ignored)
    listing.warnings = _ignored_warnings(listing.ignored)
    return listing


def _ignored_warnings(ignored: dict[str, int]) -> list[str]:
    what = {"os_debris": "OS/notebook debris file(s) (__MACOSX, .DS_Store, ._*, Thumbs.db, "
                         "hidden folders, ...)",
            "outside_class_folders": "file(s) outside <class>/ folders",
            "not_an_image": "file(s) without an image extension",
            "duplicate_rows": "duplicate manifest row(s)"}
    return [f"ignored {n} {what.get(k, k)}" for k, n in ignored.items() if n]


def _read_manifest_table(location: str) -> pa.Table:
    fs, path = storage.resolve_fs(location)
    lower = path.lower()
    types = {"path": pa.string(), "label": pa.string(), "split": pa.string()}
    if lower.endswith(".csv"):
        with fs.open_input_stream(path) as f:
            return pacsv.read_csv(f, convert_options=pacsv.ConvertOptions(column_types=types))
    if lower.endswith((".parquet", ".pq")):
        table = pq.read_table(path, filesystem=fs)
        return table.cast(pa.schema([pa.field(n, types.get(n, table.schema.field(n).type))
                                     for n in table.column_names]))
    raise DataSourceError(f"manifest: {location} must end in .csv or .parquet")


def _resolve_row_path(manifest_location: str, path: str) -> str:
    """Relative paths are relative to the manifest's folder (local or URI)."""
    if "://" in path or (os.path.isabs(path) and "://" not in manifest_location):
        return path
    if "://" in manifest_location:
        return posixpath.join(posixpath.dirname(manifest_location), path)
    return os.path.join(os.path.dirname(os.path.abspath(manifest_location)), path)


def _is_debris_path(path: str) -> bool:
    parts = [p for p in re.split(r"[\\/]", path.split("://", 1)[-1]) if p not in ("", ".", "..")]
    return any(is_debris(p) for p in parts)


def list_manifest(location: str) -> SourceListing:
    """A CSV/Parquet manifest with columns ``path``, ``label`` (class name), optional ``split``.

    Rows whose path runs through OS/notebook debris (``__MACOSX/``, ``._x.jpg``, …) are
    ignored and counted. Raises DataSourceError naming the column or row that is wrong (missing
    column, empty value, unknown split name).
    """
    try:
        table = _read_manifest_table(location)
    except FileNotFoundError:
        raise DataSourceError(f"manifest: {location} not found") from None
    missing = [c for c in ("path", "label") if c not in table.column_names]
    if missing:
        raise DataSourceError(f"manifest: {location} lacks column(s) {missing} "
                              f"(found {table.column_names})")
    paths, labels = table["path"].to_pylist(), table["label"].to_pylist()
    splits = table["split"].to_pylist() if "split" in table.column_names else [None] * len(paths)
    splits = [s.strip().lower() if s and s.strip() else None for s in splits]
    if any(s is not None for s in splits) and any(s is None for s in splits):
        raise DataSourceError(f"manifest: {location}: column split is empty on some rows; "
                              "fill it on every row or drop the column")
    items, duplicates, seen, ignored = [], [], set(), Counter()
    for row, (path, label, split) in enumerate(zip(paths, labels, splits, strict=True), start=2):
        if not path or label is None or not str(label).strip():
            raise DataSourceError(f"manifest: {location} row {row}: empty path or label")
        if split is not None and split not in SPLIT_ALIASES:
            raise DataSourceError(f"manifest: {location} row {row}: unknown split {split!r} "
                                  f"(use {', '.join(SPLITS)})")
        if _is_debris_path(path):
            ignored["os_debris"] += 1
            continue
        resolved = _resolve_row_path(location, path)
        key = resolved if "://" in resolved else os.path.normpath(resolved)
        if key in seen:  # "cat/a.png" and "./cat/a.png" are one file
            duplicates.append(f"row {row}: {path}")
            continue
        seen.add(key)
        items.append(SourceItem(resolved, class_name(str(label).strip()),
                                SPLIT_ALIASES[split] if split else None, path))
    ignored["duplicate_rows"] = len(duplicates)
    if not items:
        raise DataSourceError(f"manifest: {location} has no rows")
    listing = SourceListing(items, sort_class_names({it.label_name for it in items}),
                            ignored={k: v for k, v in ignored.items() if v})
    listing.warnings = _ignored_warnings(listing.ignored)
    if duplicates:
        listing.warnings[-1] += f", e.g. {duplicates[:3]}"
    return listing
