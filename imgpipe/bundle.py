"""The model bundle: ``bundles/<name>/v<N>/`` holding ``model.safetensors`` and ``bundle.json``.

A bundle is everything serving and evaluation need to turn an image into calibrated,
prior-corrected probabilities: weights (safetensors only, so loading never unpickles code),
architecture, the shared preprocessing, class names, the training prior, calibration and metrics.
Versions are write-once: saving picks the next ``v<N>`` and never replaces an existing one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

import imgpipe
from imgpipe import bundle_versions, storage
from imgpipe.config import format_validation_error
from imgpipe.constants import PRIOR_CHOICES
from imgpipe.data.rebalance import effective_prior
from imgpipe.data.transforms import Preprocess
from imgpipe.errors import UserError

BUNDLE_SCHEMA_VERSION = 1
META_FILE = "bundle.json"
WEIGHTS_FILE = "model.safetensors"
# Fields that may change after a bundle is written (calibration, evaluation). Everything else,
# and the weights above all, is fixed once the version exists.
UPDATABLE_FIELDS = frozenset({"temperature", "deployment_prior", "decision_threshold", "metrics"})
_VERSION_DIR = re.compile(r"^v([1-9][0-9]*)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

DeploymentPrior = Literal[PRIOR_CHOICES] | list[float]


class BundleError(UserError, ValueError):
    """A bundle that cannot be read or written: missing files, bad JSON, invalid metadata."""


class BundleChecksumError(BundleError):
    """The weights file does not match the sha256 recorded in ``bundle.json``."""


class BundleExistsError(BundleError, FileExistsError):
    """The version being written already exists (or another writer claimed it first)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Architecture(_Strict):
    """What ``imgpipe.models.create_model`` needs to rebuild the network."""

    model: str = Field(min_length=1, description="factory name: cnn | resnet18 | resnet34")
    num_classes: int = Field(ge=2)
    in_channels: int = Field(ge=1)
    cifar_stem: bool = True


class BundleMetrics(_Strict):
    """Metric blocks keyed by the names in ``imgpipe.constants`` (``macro_f1``, ...)."""

    val: dict[str, Any] = Field(default_factory=dict)
    test: dict[str, Any] = Field(default_factory=dict)


def _as_list(value: Any) -> Any:
    """numpy arrays/scalars → plain Python values, so strict validation sees int/float."""
    if isinstance(value, np.ndarray | tuple):
        return np.asarray(value).tolist()
    if isinstance(value, list):
        return [v.item() if isinstance(v, np.generic) else v for v in value]
    return value


def check_prior_vector(values: list[float], num_classes: int, what: str) -> None:
    """Raise ValueError unless ``values`` is a usable (unnormalised) class prior."""
    if len(values) != num_classes:
        raise ValueError(f"{what}: has {len(values)} values, the model has {num_classes} classes")
    if any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"{what}: values must be finite, >= 0 and not all zero, got {values}")


class BundleMeta(_Strict):
    """Contents of ``bundle.json`` (strict: unknown keys and wrong types are errors)."""

    schema_version: Literal[1] = BUNDLE_SCHEMA_VERSION
    name: str
    version: int = Field(ge=1)
    created_at: datetime
    code_version: str
    architecture: Architecture
    preprocess: Preprocess
    class_names: list[str]
    train_class_counts: list[int]
    model_prior: list[float] = Field(description="prior the model implicitly predicts for")
    temperature: float = Field(1.0, gt=0)
    deployment_prior: DeploymentPrior = "model"
    decision_threshold: float | None = Field(None, gt=0, lt=1, description="binary only")
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    metrics: BundleMetrics = Field(default_factory=BundleMetrics)
    weights_file: str = WEIGHTS_FILE
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("train_class_counts", "model_prior", "deployment_prior", mode="before")
    @classmethod
    def _plain_lists(cls, v: Any) -> Any:
        return _as_list(v)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"bundle name {v!r} must match {_NAME.pattern} (it becomes a folder)")
        return v

    @field_validator("weights_file")
    @classmethod
    def _plain_file_name(cls, v: str) -> str:
        if Path(v).name != v or v in ("", ".", ".."):
            raise ValueError(f"weights_file must be a file name inside the bundle, got {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> BundleMeta:
        n = self.architecture.num_classes
        if len(self.class_names) != n or len(set(self.class_names)) != n:
            raise ValueError(f"class_names: need {n} unique names, got {self.class_names}")
        if len(self.train_class_counts) != n or any(c < 0 for c in self.train_class_counts):
            raise ValueError(f"train_class_counts: need {n} counts >= 0")
        check_prior_vector(self.model_prior, n, "model_prior")
        if isinstance(self.deployment_prior, list):
            check_prior_vector(self.deployment_prior, n, "deployment_prior")
        if self.deployment_prior == "train" and sum(self.train_class_counts) == 0:
            raise ValueError("deployment_prior 'train' needs non-zero train_class_counts")
        if self.preprocess.channels != self.architecture.in_channels:
            raise ValueError(
                f"preprocess mode {self.preprocess.mode!r} gives {self.preprocess.channels} "
                f"channel(s), architecture.in_channels is {self.architecture.in_channels}"
            )
        if self.decision_threshold is not None and n != 2:
            raise ValueError("decision_threshold applies to binary (2-class) bundles only")
        if not math.isfinite(self.temperature):
            raise ValueError("temperature must be finite")
        return self


def code_version() -> str:
    """``imgpipe.__version__`` plus ``+g<sha>`` when the package sits in a git checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(imgpipe.__file__).parent,
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{imgpipe.__version__}+g{sha}" if sha else imgpipe.__version__


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _versions(model_dir: Path) -> list[int]:
    return bundle_versions.local_versions(model_dir)


def latest_version(root: str | Path, name: str) -> int | None:
    """Highest complete version (one with a ``bundle.json``) of ``root/name``, or None."""
    model_dir = Path(root) / name
    done = [v for v in _versions(model_dir) if (model_dir / f"v{v}" / META_FILE).is_file()]
    return done[-1] if done else None


def resolve_bundle_dir(path: str | Path) -> Path:
    """A bundle version folder, or a ``bundles/<name>`` folder (→ its latest version).

    Raises:
        BundleError: when neither a ``bundle.json`` nor a complete version is found.
    """
    p = Path(path).expanduser()
    if (p / META_FILE).is_file():
        return p
    latest = latest_version(p.parent, p.name) if p.is_dir() else None
    if latest is None:
        raise BundleError(
            f"{p}: not a bundle (no {META_FILE}) and holds no complete version v1, v2, ..."
        )
    return p / f"v{latest}"


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _meta_json(meta: BundleMeta) -> bytes:
    return (meta.model_dump_json(indent=2) + "\n").encode()


def _tensor_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage or are non-contiguous; a detached CPU
    # copy of each one is always writable and never aliases the live model.
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise BundleError(f"state_dict values must be tensors; not tensors: {bad[:5]}")
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}


def validate_meta(fields: dict[str, Any], where: str) -> BundleMeta:
    """``BundleMeta`` from a dict, or BundleError naming every invalid field."""
    try:
        return BundleMeta.model_validate(fields)
    except ValidationError as e:
        raise BundleError(format_validation_error(e, f"bundle metadata ({where})")) from None


def save_bundle(root: str | Path, name: str, state_dict: dict[str, torch.Tensor], *,
                version: int | None = None, **fields: Any) -> Path:
    """Write a new bundle version ``root/name/v<N>`` and return its path.

    ``fields`` are ``stage_bundle``'s (architecture, preprocess, class_names, ...). This is
    ``stage_bundle`` + ``publish_bundle`` with nothing checked in between; exports that verify
    the bundle first call the two themselves. ``version=None`` takes the next number never
    issued before (see ``imgpipe.bundle_versions``); readers never see half a bundle.
    ``model_prior`` defaults to the normalised training counts (plain, unweighted training);
    pass ``rebalance.effective_prior(...)`` when resampling, weights or logit adjustment were used.

    Raises:
        BundleExistsError: the version exists already (never overwritten) or a concurrent
            writer claimed it first.
        BundleError: invalid metadata (the message names the field).
    """
    staged = stage_bundle(root, name, state_dict, **fields)
    try:
        return publish_bundle(staged, version)
    finally:
        bundle_versions.discard(staged)


def stage_bundle(
    root: str | Path,
    name: str,
    state_dict: dict[str, torch.Tensor],
    *,
    architecture: Architecture | dict[str, Any],
    preprocess: Preprocess,
    class_names: list[str],
    train_class_counts: list[int] | np.ndarray,
    model_prior: list[float] | np.ndarray | None = None,
    temperature: float = 1.0,
    deployment_prior: DeploymentPrior = "model",
    decision_threshold: float | None = None,
    hyperparameters: dict[str, Any] | None = None,
    metrics: BundleMetrics | dict[str, Any] | None = None,
) -> Path:
    """Write a complete bundle into a staging folder ``root/name/.staging-<id>`` and return it.

    The staged bundle loads like any other (``Predictor.load``) but is not a version: nothing
    lists or serves it until ``publish_bundle`` renames it. Its ``version`` field is provisional.
    Arguments as ``save_bundle``. Raises BundleError for invalid metadata.
    """
    model_dir = Path(root) / name
    if not _NAME.match(name):
        raise BundleError(f"bundle name {name!r} must match {_NAME.pattern} (it becomes a folder)")
    version = bundle_versions.last_issued(model_dir) + 1
    if model_prior is None:
        model_prior = effective_prior(train_class_counts) if np.sum(train_class_counts) > 0 else (
            np.full(len(class_names), 1.0 / max(len(class_names), 1)))
    weights = save_safetensors_bytes(_tensor_dict(state_dict), metadata={"format": "pt"})
    meta = validate_meta({
        "name": name, "version": version, "created_at": datetime.now(timezone.utc),
        "code_version": code_version(), "architecture": architecture, "preprocess": preprocess,
        "class_names": list(class_names), "train_class_counts": train_class_counts,
        "model_prior": model_prior, "temperature": float(temperature),
        "deployment_prior": deployment_prior, "decision_threshold": decision_threshold,
        "hyperparameters": hyperparameters or {}, "metrics": metrics or BundleMetrics(),
        "weights_file": WEIGHTS_FILE, "weights_sha256": sha256_bytes(weights),
    }, f"{model_dir}/v{version}")
    try:
        meta_bytes = _meta_json(meta)
    except (TypeError, ValueError) as e:  # e.g. a hyperparameter that is not JSON-serialisable
        raise BundleError(f"bundle metadata is not JSON-serialisable: {e}") from None
    staged = bundle_versions.new_staging_dir(model_dir)
    try:
        _fsync_write(staged / WEIGHTS_FILE, weights)
        _fsync_write(staged / META_FILE, meta_bytes)
    except BaseException:
        bundle_versions.discard(staged)
        raise
    return staged


def _set_version(bundle_dir: Path, version: int) -> None:
    meta = BundleMeta.model_validate_json((bundle_dir / META_FILE).read_text())
    _replace_meta(bundle_dir, _meta_json(meta.model_copy(update={"version": version})))


def publish_bundle(staged: Path, version: int | None = None) -> Path:
    """Publish a staged bundle as ``v<N>`` (the next number never issued, or ``version``).

    Raises:
        BundleExistsError: ``version`` exists or was issued before (never overwritten/reused).
    """
    try:
        return bundle_versions.publish_staged(staged, staged.parent, _set_version, version)
    except bundle_versions.VersionClaimError as e:
        raise BundleExistsError(str(e)) from None


def publish_bundle_to(staged: Path, root: str) -> str:
    """Publish a staged (local) bundle under ``root``: a local folder or an object-store URI."""
    if not storage.is_uri(root):
        target = Path(storage.absolute_location(root)) / staged.parent.name
        if target.resolve() != staged.parent.resolve():
            raise BundleError(f"{staged} was staged outside {target}")
        return str(publish_bundle(staged))
    return bundle_versions.publish_to_uri(staged, root, staged.parent.name, _set_version,
                                          META_FILE)


def load_bundle_meta(path: str | Path) -> BundleMeta:
    """Read and validate ``bundle.json`` (no weights). ``path`` as for ``resolve_bundle_dir``."""
    bundle_dir = resolve_bundle_dir(path)
    meta_path = bundle_dir / META_FILE
    try:
        text = meta_path.read_text()
        json.loads(text)
    except OSError as e:
        raise BundleError(f"{meta_path}: cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise BundleError(f"{meta_path}: not valid JSON: {e}") from None
    try:
        return BundleMeta.model_validate_json(text)
    except ValidationError as e:
        raise BundleError(format_validation_error(e, f"bundle metadata ({meta_path})")) from None


def _read_verified_weights(bundle_dir: Path, meta: BundleMeta) -> bytes:
    weights_path = bundle_dir / meta.weights_file
    try:
        data = weights_path.read_bytes()
    except OSError as e:
        raise BundleError(f"{weights_path}: cannot read weights: {e}") from None
    digest = sha256_bytes(data)
    if digest != meta.weights_sha256:
        raise BundleChecksumError(
            f"{weights_path}: sha256 {digest} does not match bundle.json's {meta.weights_sha256}; "
            "the weights were changed or corrupted after the bundle was written"
        )
    return data


def verify_bundle(path: str | Path) -> BundleMeta:
    """Validated metadata after checking the weights' sha256 (tensors are not parsed).

    Raises:
        BundleChecksumError / BundleError: as ``load_bundle``.
    """
    bundle_dir = resolve_bundle_dir(path)
    meta = load_bundle_meta(bundle_dir)
    _read_verified_weights(bundle_dir, meta)
    return meta


def load_bundle(path: str | Path) -> tuple[BundleMeta, dict[str, torch.Tensor]]:
    """Read a bundle: validated metadata and the CPU state dict, after checking the sha256.

    Weights are read with safetensors only (tensors, never pickled code). The bytes are hashed
    and parsed from the same buffer, so the checked file is the loaded file.

    Raises:
        BundleChecksumError: the weights do not match the recorded checksum.
        BundleError: missing files, bad JSON, invalid metadata, unreadable safetensors.
    """
    bundle_dir = resolve_bundle_dir(path)
    meta = load_bundle_meta(bundle_dir)
    data = _read_verified_weights(bundle_dir, meta)
    try:
        state = load_safetensors_bytes(data)
    except (SafetensorError, ValueError) as e:
        where = bundle_dir / meta.weights_file
        raise BundleError(f"{where}: not a safetensors file: {e}") from None
    return meta, state


def val_in_sample(meta: BundleMeta, what: str) -> str | None:
    """Why ``what`` must not use this bundle's val split, or None when val is held out.

    A bundle refit on train+val (``imgpipe.tuning.refit``, recorded under
    ``hyperparameters["refit"]``) trained on val: anything fitted or estimated on val would
    measure in-sample behaviour (over-confidence, a near-diagonal confusion matrix).
    """
    if not meta.hyperparameters.get("refit"):
        return None
    return (f"{meta.name} v{meta.version} was refit on train+val, so its val split is "
            f"in-sample and {what} on it would measure its training data")


def update_bundle_meta(path: str | Path, **fields: Any) -> BundleMeta:
    """Change calibration/evaluation fields of an existing bundle and return the new metadata.

    Allowed: ``temperature``, ``deployment_prior``, ``decision_threshold`` and ``metrics`` (a
    dict of splits, merged split by split). The weights and their checksum are verified first
    and never touched; ``bundle.json`` is replaced atomically.

    Raises:
        BundleError: an unknown or fixed field, invalid values, or an unreadable bundle.
        BundleChecksumError: the weights no longer match (nothing is written then).
    """
    fixed = sorted(set(fields) - UPDATABLE_FIELDS)
    if fixed:
        raise BundleError(
            f"cannot update {fixed}: only {sorted(UPDATABLE_FIELDS)} change after a bundle is "
            "written (save a new version for anything else)"
        )
    bundle_dir = resolve_bundle_dir(path)
    with bundle_versions.meta_lock(bundle_dir):  # no lost update between concurrent writers
        return _update_locked(bundle_dir, fields)


def update_staged_meta(staged: Path, **fields: Any) -> BundleMeta:
    """``update_bundle_meta`` for a staged bundle (no lock: no other writer can see it)."""
    return _update_locked(staged, fields)


def _update_locked(bundle_dir: Path, fields: dict[str, Any]) -> BundleMeta:
    meta = verify_bundle(bundle_dir)
    data = meta.model_dump()
    if "metrics" in fields:
        new_metrics = fields.pop("metrics")
        if isinstance(new_metrics, BundleMetrics):
            new_metrics = new_metrics.model_dump(exclude_unset=True)
        data["metrics"] = {**data["metrics"], **dict(new_metrics)}
    data.update(fields)
    new_meta = validate_meta(data, str(bundle_dir))
    _replace_meta(bundle_dir, _meta_json(new_meta))
    return new_meta


def _replace_meta(bundle_dir: Path, meta_bytes: bytes) -> None:
    """Atomically replace ``bundle.json``: readers see the old or the new file, never half."""
    tmp = bundle_dir / f".{META_FILE}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        _fsync_write(tmp, meta_bytes)
        os.replace(tmp, bundle_dir / META_FILE)
    finally:
        tmp.unlink(missing_ok=True)
