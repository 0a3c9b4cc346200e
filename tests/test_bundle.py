"""The bundle format: write-once versions, checksums, strict metadata, weights-only loading."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_test_bundle

import imgpipe
from imgpipe.bundle import (
    META_FILE,
    WEIGHTS_FILE,
    BundleChecksumError,
    BundleError,
    BundleExistsError,
    latest_version,
    load_bundle,
    load_bundle_meta,
    resolve_bundle_dir,
    save_bundle,
    update_bundle_meta,
    verify_bundle,
)
from imgpipe.data.transforms import Preprocess


def _kwargs(num_classes: int = 3, **extra):
    return {
        "architecture": {"model": "cnn", "num_classes": num_classes, "in_channels": 1},
        "preprocess": Preprocess(image_size=16),
        "class_names": [f"c{i}" for i in range(num_classes)],
        "train_class_counts": [10 * (i + 1) for i in range(num_classes)],
        **extra,
    }


def _state() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)}


def test_round_trip_and_versions(tmp_path):
    first = make_test_bundle(tmp_path, name="m", metrics={"val": {"macro_f1": 0.5}})
    second = make_test_bundle(tmp_path, name="m", seed=1)
    assert (first.name, second.name) == ("v1", "v2")
    assert latest_version(tmp_path, "m") == 2
    assert resolve_bundle_dir(tmp_path / "m") == second
    meta, state = load_bundle(first)
    assert meta.version == 1 and meta.name == "m" and meta.schema_version == 1
    assert meta.code_version.startswith(imgpipe.__version__)
    assert meta.metrics.val == {"macro_f1": 0.5}
    assert meta.model_prior == pytest.approx(np.array([100, 50, 25]) / 175)
    assert set(json.loads((first / META_FILE).read_text())) >= {
        "architecture", "preprocess", "class_names", "train_class_counts", "model_prior",
        "temperature", "deployment_prior", "decision_threshold", "hyperparameters", "metrics",
        "weights_file", "weights_sha256", "code_version", "created_at"}
    assert all(isinstance(t, torch.Tensor) for t in state.values())


def test_state_dict_exact_and_numpy_inputs(tmp_path):
    shared = torch.zeros(4)
    state = {**_state(), "tied_a": shared, "tied_b": shared}  # shared storage is fine
    path = save_bundle(tmp_path, "m", state, **_kwargs(train_class_counts=np.array([3, 2, 1]),
                                                        model_prior=np.array([0.2, 0.3, 0.5])))
    meta, loaded = load_bundle(path)
    for k, v in state.items():
        assert torch.equal(loaded[k], v)
    assert meta.train_class_counts == [3, 2, 1] and meta.model_prior == [0.2, 0.3, 0.5]


def test_never_overwrites(tmp_path):
    path = save_bundle(tmp_path, "m", _state(), **_kwargs())
    before = (path / WEIGHTS_FILE).read_bytes()
    with pytest.raises(BundleExistsError, match="never overwritten"):
        save_bundle(tmp_path, "m", {"w": torch.zeros(1)}, **_kwargs(), version=1)
    assert (path / WEIGHTS_FILE).read_bytes() == before
    # A folder claimed by a concurrent writer (still empty) is not reused either.
    (tmp_path / "m" / "v2").mkdir()
    with pytest.raises(BundleExistsError):
        save_bundle(tmp_path, "m", _state(), **_kwargs(), version=2)
    assert latest_version(tmp_path, "m") == 1  # an incomplete version is not "latest"
    assert save_bundle(tmp_path, "m", _state(), **_kwargs()).name == "v3"
    assert not list((tmp_path / "m").glob(".tmp-*"))


def test_checksum_mismatch(tmp_path):
    path = save_bundle(tmp_path, "m", _state(), **_kwargs())
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleChecksumError, match="does not match"):
        load_bundle(path)
    with pytest.raises(BundleChecksumError):
        verify_bundle(path)
    with pytest.raises(BundleChecksumError):
        update_bundle_meta(path, temperature=2.0)


def test_never_unpickles(tmp_path):
    """A pickle with a valid checksum is refused as not-safetensors, and never executed."""
    path = save_bundle(tmp_path, "m", _state(), **_kwargs())
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    payload = pickle.dumps(Payload())
    (path / WEIGHTS_FILE).write_bytes(payload)
    meta = json.loads((path / META_FILE).read_text())
    import hashlib

    meta["weights_sha256"] = hashlib.sha256(payload).hexdigest()
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="not a safetensors file"):
        load_bundle(path)
    assert not marker.exists()


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / META_FILE).unlink(), "not a bundle"),
    (lambda p: (p / WEIGHTS_FILE).unlink(), "cannot read weights"),
    (lambda p: (p / META_FILE).write_text("{not json"), "not valid JSON"),
    (lambda p: (p / META_FILE).write_text(
        (p / META_FILE).read_text().replace('"temperature"', '"temprature"')), "temprature"),
    (lambda p: (p / META_FILE).write_text(
        (p / META_FILE).read_text().replace('"version": 1', '"version": "1"')), "version"),
])
def test_clear_errors_for_broken_bundles(tmp_path, damage, message):
    path = save_bundle(tmp_path, "m", _state(), **_kwargs())
    damage(path)
    with pytest.raises(BundleError, match=message):
        load_bundle(path)


@pytest.mark.parametrize("extra, message", [
    ({"class_names": ["a", "b"]}, "class_names"),
    ({"class_names": ["a", "a", "b"]}, "class_names"),
    ({"train_class_counts": [1, 2]}, "train_class_counts"),
    ({"deployment_prior": [0.5, 0.5]}, "deployment_prior"),
    ({"deployment_prior": [0.0, 0.0, 0.0]}, "deployment_prior"),
    ({"deployment_prior": "uniform"}, "deployment_prior"),
    ({"decision_threshold": 0.3}, "binary"),
    ({"temperature": 0.0}, "temperature"),
    ({"preprocess": Preprocess(mode="RGB", mean=(0.5,) * 3, std=(0.5,) * 3)}, "channel"),
    ({"hyperparameters": {"fn": object()}}, "JSON"),
])
def test_invalid_metadata_refused(tmp_path, extra, message):
    with pytest.raises(BundleError, match=message):
        save_bundle(tmp_path, "m", _state(), **_kwargs(**extra))
    assert latest_version(tmp_path, "m") is None


def test_bad_name_refused(tmp_path):
    with pytest.raises(BundleError, match="name"):
        save_bundle(tmp_path, "../escape", _state(), **_kwargs())


def test_binary_threshold_allowed(tmp_path):
    path = save_bundle(tmp_path, "bin", _state(), **_kwargs(num_classes=2, decision_threshold=0.3))
    assert load_bundle_meta(path).decision_threshold == 0.3


def test_update_meta_keeps_checksum(tmp_path):
    path = save_bundle(tmp_path, "m", _state(), **_kwargs(metrics={"val": {"accuracy": 0.9}}))
    meta = update_bundle_meta(path, temperature=1.7, deployment_prior="balanced",
                              metrics={"test": {"macro_f1": 0.4}})
    assert meta.temperature == 1.7 and meta.deployment_prior == "balanced"
    assert meta.metrics.val == {"accuracy": 0.9} and meta.metrics.test == {"macro_f1": 0.4}
    reloaded, _ = load_bundle(path)  # checksum still valid
    assert reloaded == meta
    before = (path / META_FILE).read_text()
    with pytest.raises(BundleError, match="cannot update"):
        update_bundle_meta(path, weights_sha256="0" * 64)
    with pytest.raises(BundleError, match="temperature"):
        update_bundle_meta(path, temperature=-1.0)
    assert (path / META_FILE).read_text() == before
