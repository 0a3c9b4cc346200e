"""Drills for bundle integrity: staged, verified publication; versions never reused, only
increasing under failures and concurrent exports; bundle.json updates without lost writes."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imgpipe.bundle import (
    META_FILE,
    BundleError,
    latest_version,
    load_bundle,
    load_bundle_meta,
    publish_bundle,
    save_bundle,
    stage_bundle,
    update_bundle_meta,
)
from imgpipe.bundle_versions import COUNTER_FILE, STAGING_PREFIX
from imgpipe.constants import ACCURACY, BALANCED_ACCURACY, MACRO_F1, NLL, VAL, VAL_LOSS, val_key
from imgpipe.data.transforms import Preprocess

CTX = mp.get_context("spawn")  # fresh interpreters: real separate processes, no shared state


def _kwargs(num_classes: int = 3) -> dict:
    return {"architecture": {"model": "cnn", "num_classes": num_classes, "in_channels": 1},
            "preprocess": Preprocess(image_size=16),
            "class_names": [f"c{i}" for i in range(num_classes)],
            "train_class_counts": [10 * (i + 1) for i in range(num_classes)]}


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g)}


# A child process that publishes staged bundles through the real version claim. It imports no
# torch (so it starts in a blink) and writes the version the way bundle._set_version does.
_PUBLISHER = """
import json, sys
from pathlib import Path
from imgpipe.bundle_versions import publish_staged

def set_version(staged, version):
    meta = json.loads((staged / "bundle.json").read_text())
    meta["version"] = version
    (staged / "bundle.json").write_text(json.dumps(meta))

model_dir, *staged = sys.argv[1:]
print(json.dumps([publish_staged(Path(s), Path(model_dir), set_version).name for s in staged]))
"""


def test_two_concurrent_exporters_never_share_a_version(tmp_path):
    staged = [str(stage_bundle(tmp_path, "m", _state(i), **_kwargs())) for i in range(16)]
    procs = [subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(tmp_path / "m"),
                               *staged[k::2]], stdout=subprocess.PIPE, text=True)
             for k in range(2)]
    names = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        names += json.loads(out)
    versions = sorted(int(n[1:]) for n in names)
    assert versions == list(range(1, 17))  # 16 distinct numbers, none lost, none shared
    for v in versions:  # every version is complete, loadable and numbered as its folder
        meta, _ = load_bundle(tmp_path / "m" / f"v{v}")
        assert meta.version == v
    assert not list((tmp_path / "m").glob(f"{STAGING_PREFIX}*"))


def test_a_failed_publication_burns_its_number_instead_of_reusing_it(tmp_path, monkeypatch):
    assert save_bundle(tmp_path, "m", _state(), **_kwargs()).name == "v1"
    staged = stage_bundle(tmp_path, "m", _state(1), **_kwargs())
    real_rename = os.rename

    def broken_rename(src, dst):
        if Path(src) == staged:
            raise OSError("disk went away")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", broken_rename)
    with pytest.raises(OSError, match="disk went away"):
        publish_bundle(staged)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not (tmp_path / "m" / "v2").exists() and latest_version(tmp_path, "m") == 1
    assert (tmp_path / "m" / COUNTER_FILE).read_text().strip() == "2"
    assert publish_bundle(staged).name == "v3"  # v2 was issued once: never again


def test_an_explicit_version_at_or_below_the_last_issued_is_refused(tmp_path):
    save_bundle(tmp_path, "m", _state(), **_kwargs(), version=4)
    with pytest.raises(BundleError, match="never overwritten or reused"):
        save_bundle(tmp_path, "m", _state(), **_kwargs(), version=3)
    assert save_bundle(tmp_path, "m", _state(), **_kwargs()).name == "v5"


def _update_many(bundle: str, field: str, n: int) -> None:
    for i in range(n):
        if field == "temperature":
            update_bundle_meta(bundle, temperature=1.0 + (i + 1) / 100)
        else:
            update_bundle_meta(bundle, metrics={"test": {"round": i + 1}})


def test_concurrent_bundle_json_updates_lose_nothing(tmp_path):
    bundle = save_bundle(tmp_path, "m", _state(), **_kwargs())
    procs = [CTX.Process(target=_update_many, args=(str(bundle), f, 10))
             for f in ("temperature", "metrics")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=400)
        assert p.exitcode == 0
    meta = load_bundle_meta(bundle)  # valid JSON, checksum-consistent
    # Each writer's last value survived the other's read-modify-write cycles.
    assert meta.temperature == pytest.approx(1.10) and meta.metrics.test == {"round": 10}
    assert json.loads((bundle / META_FILE).read_text())["version"] == 1
    assert not list(bundle.glob(f".{META_FILE}.*"))


# ---------------------------------------------------------------------------------------------
# export: verification in staging, tolerance from the split size
# ---------------------------------------------------------------------------------------------

def test_tolerance_allows_one_flip_and_scales_with_the_split():
    from imgpipe.tuning.export import verification_tolerance

    tol = verification_tolerance([20] * 10)  # 200 images, 10 classes of 20
    assert tol[ACCURACY] == pytest.approx(1 / 200)
    assert tol[BALANCED_ACCURACY] == pytest.approx(1 / (10 * 20))
    assert tol[MACRO_F1] == pytest.approx(3 / (10 * 20))
    big = verification_tolerance([10_000] * 10)  # 100k images: 0.1% = 100 flips
    assert big[ACCURACY] == pytest.approx(100 / 100_000)


def test_one_flipped_prediction_stays_within_tolerance():
    """Flip each single prediction of a real confusion matrix: every metric moves < tolerance."""
    import numpy as np

    from imgpipe.metrics import classification_metrics
    from imgpipe.tuning.export import verification_tolerance

    rng = np.random.default_rng(0)
    support = [3, 5, 8, 13, 21]
    y = np.repeat(np.arange(5), support)
    pred = np.where(rng.random(len(y)) < 0.7, y, rng.integers(0, 5, len(y)))
    base = classification_metrics(np.bincount(5 * y + pred, minlength=25).reshape(5, 5))
    tol = verification_tolerance(support)
    for i in range(len(y)):
        for c in range(5):
            p2 = pred.copy()
            p2[i] = c
            m = classification_metrics(np.bincount(5 * y + p2, minlength=25).reshape(5, 5))
            for k in (ACCURACY, BALANCED_ACCURACY, MACRO_F1):
                assert abs(m[k] - base[k]) <= tol[k] + 1e-12, (k, i, c)


def _checkpoint(tiny_digits: str, dest: Path, **reported_shift: float) -> Path:
    """A real training checkpoint of a random CNN with its true val metrics (optionally off)."""
    from imgpipe.checkpoint import save_checkpoint
    from imgpipe.config import TrainConfig
    from imgpipe.data.shards import load_manifest
    from imgpipe.evaluate import evaluate_checkpoint
    from imgpipe.models import create_model

    manifest = load_manifest(tiny_digits)
    pre = manifest.preprocess(16)
    cfg = TrainConfig(data=tiny_digits, model={"name": "cnn", "image_size": 16, "cifar_stem": True})
    torch.manual_seed(0)
    meta = {"train": cfg.model_dump(mode="json"), "preprocess": pre.model_dump(mode="json"),
            "class_names": list(manifest.class_names),
            "train_counts": [int(c) for c in manifest.counts_vector("train")], "epoch": 3}
    save_checkpoint(dest, create_model("cnn", len(manifest.class_names), in_channels=1), meta)
    val = evaluate_checkpoint(dest, tiny_digits, VAL)
    meta.update({val_key(k): val[k] + reported_shift.get(k, 0.0)
                 for k in (ACCURACY, BALANCED_ACCURACY, MACRO_F1)})
    meta[VAL_LOSS] = val[NLL]
    (dest / "meta.json").write_text(json.dumps(meta))
    return dest


def test_failed_verification_publishes_nothing_and_uses_no_number(tiny_digits, tmp_path):
    from imgpipe.tuning.export import ExportVerificationError, export_bundle

    root = tmp_path / "bundles"
    bad = _checkpoint(tiny_digits, tmp_path / "bad", macro_f1=0.2)  # not what the model scores
    with pytest.raises(ExportVerificationError, match="macro_f1"):
        export_bundle(bad, tiny_digits, str(root), "digits")
    assert latest_version(root, "digits") is None
    assert not [p for p in (root / "digits").iterdir() if not p.name.startswith(".")]
    assert not list((root / "digits").glob(f"{STAGING_PREFIX}*"))
    finished: list[Path] = []

    def finish(staged: Path) -> None:  # runs on the verified bundle before it is published
        assert not (root / "digits" / "v1").exists()
        finished.append(staged)

    good = _checkpoint(tiny_digits, tmp_path / "good")
    location, metrics = export_bundle(good, tiny_digits, str(root), "digits", finish=finish)
    assert Path(location) == root / "digits" / "v1" and finished
    meta, _ = load_bundle(location)
    assert meta.metrics.val["verification"]["max_abs_diff"] == 0.0
    assert metrics["test"]["num_rows"] == 100


def test_export_to_a_uri_bundle_root(tiny_digits, tmp_path):
    """``--bundle-root`` as a URI: verified locally, then written through pyarrow's filesystem."""
    from imgpipe.tuning.export import export_bundle

    ckpt = _checkpoint(tiny_digits, tmp_path / "ckpt")
    uri = f"file://{tmp_path / 'bucket' / 'bundles'}"
    first, _ = export_bundle(ckpt, tiny_digits, uri, "digits")
    second, _ = export_bundle(ckpt, tiny_digits, uri, "digits")
    assert (first, second) == (f"{uri}/digits/v1", f"{uri}/digits/v2")
    meta, _ = load_bundle(tmp_path / "bucket" / "bundles" / "digits" / "v2")
    assert meta.version == 2
