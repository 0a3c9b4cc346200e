"""``PrepareConfig`` → Parquet shards + manifest, from an embedded dataset or the user's images."""

from __future__ import annotations

import logging
import os
from typing import Any

import pyarrow.fs as pafs

from imgpipe import storage
from imgpipe.config import ConfigError, PrepareConfig
from imgpipe.data.datasets import LabeledImages, load_digits_lt, load_shapes_lt
from imgpipe.data.ingest import canonical_location, ingest_image_folder, ingest_manifest
from imgpipe.data.manifest import Manifest, ManifestError, load_manifest
from imgpipe.data.shards import write_shards

log = logging.getLogger(__name__)

# The PrepareConfig fields that change the prepared rows, per kind of source. rows_per_shard and
# out do not: a moved directory or a different shard size is the same data.
_MATCH_FIELDS = {
    "digits-lt": ("val_per_class", "test_per_class"),
    "shapes-lt": ("val_per_class", "test_per_class", "num_classes", "images_per_class",
                  "image_size"),
    "own": ("val_fraction", "test_fraction"),
}


def effective_imbalance_ratio(cfg: PrepareConfig) -> float | None:
    """The long-tail ratio to apply: the configured one for embedded data; for the user's own
    images only when ``imbalance_ratio`` was set explicitly (own data keeps its natural balance).
    """
    if cfg.dataset is not None:
        return cfg.imbalance_ratio
    return cfg.imbalance_ratio if "imbalance_ratio" in cfg.model_fields_set else None


def resolve_out(cfg: PrepareConfig) -> PrepareConfig:
    """``out`` defaults to ``data/<dataset>`` for embedded data; own data must name it.

    PrepareConfig's static default (``data/digits-lt``) would otherwise put shapes-lt or the
    user's own images under a directory named after another dataset.

    Raises:
        ConfigError: own data (image_folder/manifest) without an explicit ``out``.
    """
    if "out" in cfg.model_fields_set:
        return cfg
    if cfg.dataset is None:
        raise ConfigError("out: required with image_folder/manifest (where the shards go)")
    return cfg.model_copy(update={"out": f"data/{cfg.dataset}"})


def _check_out(cfg: PrepareConfig) -> None:
    """Refuse to write shards inside the image tree being read (they would be read next time)."""
    if cfg.image_folder is None or "://" in cfg.image_folder or "://" in cfg.out:
        return
    src, out = os.path.abspath(cfg.image_folder), os.path.abspath(cfg.out)
    if out == src or out.startswith(src + os.sep):
        raise ConfigError(f"out: {cfg.out} is inside image_folder {cfg.image_folder}; "
                          "write the shards somewhere else")


def load_source(cfg: PrepareConfig) -> LabeledImages:
    """The images ``cfg`` names, split and (where asked) long-tailed, in memory."""
    ratio = effective_imbalance_ratio(cfg)
    if cfg.dataset == "digits-lt":
        return load_digits_lt(ratio, cfg.seed, cfg.val_per_class, cfg.test_per_class)
    if cfg.dataset == "shapes-lt":
        return load_shapes_lt(cfg.num_classes, cfg.images_per_class, ratio, cfg.image_size,
                              cfg.seed, cfg.val_per_class, cfg.test_per_class)
    own: dict[str, Any] = {"seed": cfg.seed, "val_fraction": cfg.val_fraction,
                           "test_fraction": cfg.test_fraction, "imbalance_ratio": ratio}
    if cfg.image_folder is not None:
        return ingest_image_folder(cfg.image_folder, **own)
    assert cfg.manifest is not None  # PrepareConfig guarantees exactly one source
    return ingest_manifest(cfg.manifest, **own)


def prepare(cfg: PrepareConfig) -> Manifest:
    """Build the shards ``cfg`` describes under ``cfg.out`` and return their manifest.

    Raises:
        ConfigError: ``out`` inside the image folder being read.
        ValueError: a source that cannot be prepared (no images, quotas too large, ...).
    """
    _check_out(cfg)
    data = load_source(cfg)
    meta = {"source": data.source, "seed": data.seed, "imbalance_ratio": data.imbalance_ratio,
            "mode": data.mode, "skipped": data.skipped, "skipped_count": data.skipped_count,
            "ignored": data.ignored, "warnings": data.warnings,
            "config": cfg.model_dump(mode="json")}
    manifest = write_shards(cfg.out, data.splits, data.class_names, meta,
                            rows_per_shard=cfg.rows_per_shard)
    log.info("prepared %s → %s (%s)", data.source, cfg.out, manifest.num_rows)
    return manifest


def _expected_source(cfg: PrepareConfig) -> str:
    if cfg.dataset is not None:
        return cfg.dataset
    if cfg.image_folder is not None:
        return f"image-folder:{canonical_location(cfg.image_folder)}"
    return f"manifest:{canonical_location(cfg.manifest)}"


def manifest_matches(manifest: Manifest, cfg: PrepareConfig) -> bool:
    """Whether ``manifest`` was prepared from the same source, seed, ratio and split sizes."""
    fields = _MATCH_FIELDS.get(cfg.dataset or "own", ())
    return (manifest.source == _expected_source(cfg)
            and manifest.seed == cfg.seed
            and manifest.imbalance_ratio == effective_imbalance_ratio(cfg)
            and all(manifest.config.get(f) == getattr(cfg, f) for f in fields))


def _files_present(manifest: Manifest, root: str) -> bool:
    fs, base = storage.resolve_fs(root)
    paths = [f"{base}/{rel}" for files in manifest.files.values() for rel in files]
    return all(i.type == pafs.FileType.File for i in fs.get_file_info(paths))


def ensure_prepared(cfg: PrepareConfig) -> Manifest:
    """Reuse the shards at ``cfg.out`` when their manifest matches ``cfg``; else prepare them.

    Matching compares source, seed, effective imbalance ratio and the split-size fields, and
    checks that every listed file exists. The tune job calls this for its default data.
    """
    try:
        manifest = load_manifest(cfg.out)
    except ManifestError as e:
        log.info("preparing %s: %s", cfg.out, e)
        return prepare(cfg)
    if manifest_matches(manifest, cfg) and _files_present(manifest, cfg.out):
        log.info("reusing prepared data at %s", storage.join(cfg.out, "manifest.json"))
        return manifest
    log.warning("%s was prepared with different settings (or is incomplete); preparing again",
                cfg.out)
    return prepare(cfg)
