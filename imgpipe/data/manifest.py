"""The manifest of a prepared shard folder: ``<root>/manifest.json``.

Classes, per-split counts, the images' native size and mode, the train split's pixel
statistics, skipped/ignored inputs and provenance. Written last by ``shards.write_shards``, so a
manifest always describes complete shards; every job reads it before touching the shards.
"""

from __future__ import annotations

import json
import posixpath
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
import pyarrow.fs as pafs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from imgpipe import storage
from imgpipe.constants import IMAGE, LABEL, MANIFEST_FILE, SHARD_SCHEMA_VERSION, TRAIN
from imgpipe.data.decode import GREY_MODES, ImageDecodeError, open_image, read_image_header, to_mode
from imgpipe.data.transforms import Preprocess
from imgpipe.errors import DataSourceError, UserError

MAX_SKIPPED_EXAMPLES = 20


class ManifestError(UserError, ValueError):
    """A shard directory whose manifest is missing, unreadable, invalid or from another version."""


class ManifestNotFoundError(ManifestError, FileNotFoundError):
    """No ``manifest.json`` at the given root (callers may prepare the data there)."""


class ImageInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    height: int | None = Field(description="native height if every image shares it, else null")
    width: int | None
    mode: Literal["L", "RGB"]


class SkippedExample(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = None
    id: str | None = None
    reason: str


class Skipped(BaseModel):
    model_config = ConfigDict(extra="forbid")

    count: int = Field(0, ge=0)
    examples: list[SkippedExample] = Field(default_factory=list)


class Manifest(BaseModel):
    """What a shard directory holds; written beside the Parquet files as ``manifest.json``."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int
    source: str
    class_names: list[str] = Field(min_length=1)
    counts: dict[str, dict[str, int]]
    num_rows: dict[str, int]
    image: ImageInfo
    pixel_mean: list[float] = Field(description="per channel, train split, pixels in [0, 1]")
    pixel_std: list[float]
    seed: int
    imbalance_ratio: float | None
    skipped: Skipped = Field(default_factory=Skipped)
    ignored: dict[str, int] = Field(
        default_factory=dict, description="files left out on purpose, by reason (os_debris, "
        "not_an_image, outside_class_folders, duplicate_rows)")
    warnings: list[str] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict, description="resolved PrepareConfig")
    created_at: str
    files: dict[str, list[str]] = Field(description="split → paths relative to the root")

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names: duplicate names")
        for split, per_class in self.counts.items():
            if list(per_class) != self.class_names:
                raise ValueError(f"counts.{split}: keys must be class_names, in class order")
            if sum(per_class.values()) != self.num_rows.get(split):
                raise ValueError(f"num_rows.{split}: does not equal the sum of counts.{split}")
        if set(self.files) != set(self.counts) or set(self.num_rows) != set(self.counts):
            raise ValueError("files, num_rows and counts must name the same splits")
        channels = 1 if self.image.mode == "L" else 3
        if len(self.pixel_mean) != channels or len(self.pixel_std) != channels:
            raise ValueError(f"pixel_mean/pixel_std: need {channels} value(s) for mode "
                             f"{self.image.mode!r}")
        return self

    @property
    def splits(self) -> list[str]:
        return list(self.counts)

    def counts_vector(self, split: str) -> list[int]:
        """Per-class row counts of ``split`` in class-index order (zeros included)."""
        if split not in self.counts:
            raise KeyError(f"split {split!r} not in manifest (have {self.splits})")
        return [self.counts[split][name] for name in self.class_names]

    def preprocess(self, image_size: int) -> Preprocess:
        """The eval preprocessing for this data: its mode and train-split mean/std."""
        # A constant channel (e.g. an all-black border) has std 0, which would divide by zero.
        std = tuple(s if s > 1e-6 else 1.0 for s in self.pixel_std)
        return Preprocess(image_size=image_size, mode=self.image.mode,
                          mean=tuple(self.pixel_mean), std=std)


# ---------------------------------------------------------------------------------------------
# filesystems
# ---------------------------------------------------------------------------------------------


def _image_stats(records_by_split: dict[str, list[dict]], mode: str) -> dict[str, Any]:
    """Native size (if shared) of all images and per-channel mean/std of the train split."""
    sizes: set[tuple[int, int]] = set()
    channels = 1 if mode == "L" else 3
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    n_pixels = 0
    for split, records in records_by_split.items():
        for rec in records:
            try:
                w, h, _ = read_image_header(rec[IMAGE])  # the stored size, as in the file
                sizes.add((w, h))
                if split != TRAIN:  # only the header is read for val/test
                    continue
                img = open_image(rec[IMAGE])
                arr = np.asarray(to_mode(img, mode), dtype=np.float64).reshape(-1, channels)
            except ImageDecodeError:
                # Shards may carry unusable images (the stream skips and counts them);
                # statistics come from the usable ones.
                continue
            arr /= 255.0
            total += arr.sum(axis=0)
            total_sq += (arr * arr).sum(axis=0)
            n_pixels += arr.shape[0]
    mean = total / max(n_pixels, 1)
    std = np.sqrt(np.maximum(total_sq / max(n_pixels, 1) - mean * mean, 0.0))
    width, height = next(iter(sizes)) if len(sizes) == 1 else (None, None)
    return {"image": ImageInfo(height=height, width=width, mode=mode),
            "pixel_mean": [round(float(m), 6) for m in mean],
            "pixel_std": [round(float(s), 6) for s in std]}


def detect_mode(records: list[dict]) -> str:
    """"L" when every image is greyscale (by its header), else "RGB"."""
    for rec in records:
        try:
            _, _, mode = read_image_header(rec[IMAGE])
        except ImageDecodeError:
            continue  # an unreadable image says nothing about the mode
        if mode not in GREY_MODES:
            return "RGB"
    return "L"


def build_manifest(records_by_split: dict[str, list[dict]], class_names: list[str],
                   meta: dict[str, Any], files: dict[str, list[str]], mode: str) -> Manifest:
    """The manifest describing ``records_by_split`` (counts, image stats, provenance)."""
    counts = {}
    for split, records in records_by_split.items():
        per_class = np.bincount([r[LABEL] for r in records], minlength=len(class_names))
        counts[split] = {name: int(n) for name, n in zip(class_names, per_class, strict=True)}
    skipped = meta.get("skipped") or []
    return Manifest(
        schema_version=SHARD_SCHEMA_VERSION,
        source=meta["source"],
        class_names=list(class_names),
        counts=counts,
        num_rows={split: len(records) for split, records in records_by_split.items()},
        seed=int(meta.get("seed", 0)),
        imbalance_ratio=meta.get("imbalance_ratio"),
        skipped=Skipped(count=int(meta.get("skipped_count", len(skipped))),
                        examples=skipped[:MAX_SKIPPED_EXAMPLES]),
        ignored=dict(meta.get("ignored") or {}),
        warnings=list(meta.get("warnings") or []),
        config=dict(meta.get("config") or {}),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        files=files,
        **_image_stats(records_by_split, mode),
    )


def save_manifest(manifest: Manifest, root: str) -> str:
    """Write ``<root>/manifest.json`` (via a temporary file where the filesystem can rename)."""
    fs, path = storage.resolve_fs(root, error=DataSourceError)
    target = posixpath.join(path, MANIFEST_FILE)
    data = (manifest.model_dump_json(indent=2) + "\n").encode()
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = target + ".tmp"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, target)  # atomic on one local filesystem
    else:
        with fs.open_output_stream(target) as f:  # object stores publish a whole object at once
            f.write(data)
    return storage.join(root, MANIFEST_FILE)


def load_manifest(root: str) -> Manifest:
    """Read and validate ``<root>/manifest.json`` (local path or URI).

    Raises:
        ManifestError: missing, not JSON, an unknown ``schema_version``, or invalid fields —
            the message names the path and what is wrong.
    """
    where = storage.join(root, MANIFEST_FILE)
    fs, path = storage.resolve_fs(root, error=DataSourceError)
    try:
        with fs.open_input_stream(posixpath.join(path, MANIFEST_FILE)) as f:
            raw = f.read()
    except FileNotFoundError:
        raise ManifestNotFoundError(f"{where}: not found; is {root!r} a prepared shard directory? "
                                    "(create one with jobs/prepare_data.py)") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: top level must be a JSON object")
    version = data.get("schema_version")
    if version != SHARD_SCHEMA_VERSION:
        raise ManifestError(f"{where}: schema_version {version!r} is not supported (this imgpipe "
                            f"reads {SHARD_SCHEMA_VERSION}); re-run jobs/prepare_data.py")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(top level)'}: {err['msg']}"
                             for err in e.errors())
        raise ManifestError(f"{where}: invalid manifest: {problems}") from None
