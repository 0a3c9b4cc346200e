"""Decoupled classifier re-balancing: τ-norm, LWS, cRT, feature SMOTE, the bundle stage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from imgpipe.config import RebalanceConfig
from imgpipe.decoupled.heads import (
    Head,
    balanced_indices,
    fit_crt,
    fit_lws,
    metric_scorer,
    select_tau,
    tau_normalize,
)
from imgpipe.decoupled.smote import oversample_features

REPO = Path(__file__).resolve().parents[1]


def _blobs(counts, dim=8, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(len(counts), dim))
    y = np.repeat(np.arange(len(counts)), counts)
    x = centres[y] + rng.normal(scale=spread, size=(len(y), dim))
    return x.astype(np.float32), y


def _head(c=4, d=8, seed=0) -> Head:
    g = torch.Generator().manual_seed(seed)
    return Head(torch.randn(c, d, generator=g) * torch.linspace(0.5, 3, c)[:, None],
                torch.randn(c, generator=g))


def test_tau_norm_at_zero_is_the_identity():
    head = _head()
    same = tau_normalize(head, 0.0)
    assert torch.equal(same.weight, head.weight) and torch.equal(same.bias, head.bias)
    x = torch.randn(5, 8)
    assert torch.equal(same.logits(x), head.logits(x))


def test_tau_norm_equalises_weight_norms_at_one_and_picks_tau_on_val():
    head = _head()
    unit = tau_normalize(head, 1.0)
    torch.testing.assert_close(unit.weight.norm(dim=1), torch.ones(4))
    with pytest.raises(ValueError):
        tau_normalize(head, -0.5)
    x, y = _blobs([10, 10, 10, 10])
    score = metric_scorer(y, 4, "balanced_accuracy")
    picked = select_tau(head, score, torch.from_numpy(x), tau_max=1.0, step=0.25)
    assert picked.info["tau"] in picked.info["tau_grid"]
    assert picked.info["best_val_metric"] == max(picked.info["val_metric_by_tau"])


def test_balanced_indices_are_class_uniform():
    labels = np.repeat(np.arange(4), [500, 50, 5, 1])
    rows = balanced_indices(labels, 40_000, torch.Generator().manual_seed(1)).numpy()
    assert chisquare(np.bincount(labels[rows], minlength=4)).pvalue > 1e-3


def test_crt_on_long_tailed_features_beats_the_plain_head():
    counts = [400, 120, 30, 8, 2]
    x, y = _blobs(counts, spread=2.0)
    xv, yv = _blobs([40] * 5, spread=2.0, seed=0)  # same centres (same seed), fresh noise below
    xv = xv + np.random.default_rng(9).normal(scale=0.5, size=xv.shape).astype(np.float32)
    score = metric_scorer(yv, 5, "balanced_accuracy")
    # plain head: unweighted softmax regression on the long tail
    plain = torch.nn.Linear(8, 5)
    opt = torch.optim.Adam(plain.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(plain(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    with torch.no_grad():
        base = score(plain(torch.from_numpy(xv)))
    crt = fit_crt(torch.from_numpy(x), torch.from_numpy(y), 5, score, torch.from_numpy(xv),
                  epochs=15, seed=0)
    assert crt.info["best_val_metric"] >= base
    assert np.isfinite(crt.weight.numpy()).all()


def test_lws_only_rescales_the_frozen_rows():
    head = _head(c=3)
    x, y = _blobs([200, 20, 2], seed=3)
    out = fit_lws(head, torch.from_numpy(x), torch.from_numpy(y),
                  metric_scorer(y, 3, "balanced_accuracy"), torch.from_numpy(x), epochs=3)
    s = torch.tensor(out.info["scales"])
    torch.testing.assert_close(out.weight, head.weight * s[:, None])
    torch.testing.assert_close(out.bias, head.bias * s)


@pytest.mark.parametrize("method", ["smote", "borderline", "adasyn"])
def test_smote_with_one_and_two_sample_classes(method):
    x, y = _blobs([60, 15, 2, 1], dim=6)
    xo, yo, report = oversample_features(x, y, k=5, method=method, seed=0)
    assert np.isfinite(xo).all() and xo.dtype == np.float32
    np.testing.assert_array_equal(xo[: len(x)], x)  # originals kept, first
    by_label = {r.label: r for r in report}
    assert by_label[3].duplicated == 59 and by_label[3].synthetic == 0  # 1 row: duplicated
    assert by_label[2].k_neighbors == 1 and by_label[2].synthetic > 0  # 2 rows: k lowered
    assert "k lowered" in by_label[2].note
    assert all(np.bincount(yo)[c] >= np.bincount(y)[c] for c in range(4))
    # synthetic rows of the 2-row class lie on the segment between its two rows
    a, b = x[y == 2]
    seg = xo[len(x):][yo[len(x):] == 2]
    t = (seg - a) @ (b - a) / ((b - a) @ (b - a))
    np.testing.assert_allclose(seg, a + t[:, None] * (b - a), atol=1e-4)
    assert ((t >= -1e-6) & (t <= 1 + 1e-6)).all()


def test_smote_is_seeded():
    x, y = _blobs([50, 6, 3])
    a = oversample_features(x, y, 3, seed=4)[0]
    b = oversample_features(x, y, 3, seed=4)[0]
    np.testing.assert_array_equal(a, b)


def test_config_refuses_smote_without_crt():
    with pytest.raises(ValueError, match="smote"):
        RebalanceConfig(bundle="b", data="d", method="tau-norm", smote=5)


def test_job_exits_2_on_a_bad_config_before_ray(tmp_path):
    proc = subprocess.run(
        [sys.executable, "jobs/rebalance_classifier.py", "--bundle", "x", "--data", "y",
         "--method", "lws", "--smote", "3"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "smote" in proc.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_crt_with_smote_publishes_a_verified_version_with_the_backbone_bit_identical(
        ray_session, tiny_digits, tmp_path):
    import json

    from imgpipe.bundle import load_bundle, save_bundle
    from imgpipe.data.shards import load_manifest
    from imgpipe.decoupled.stage import rebalance_classifier
    from imgpipe.models import create_model

    manifest = load_manifest(tiny_digits)
    pre = manifest.preprocess(16)
    torch.manual_seed(0)
    net = create_model("cnn", len(manifest.class_names), in_channels=pre.channels).eval()
    src = save_bundle(tmp_path / "bundles", "digits", net.state_dict(),
                      architecture={"model": "cnn", "num_classes": len(manifest.class_names),
                                    "in_channels": pre.channels},
                      preprocess=pre, class_names=list(manifest.class_names),
                      train_class_counts=list(manifest.counts_vector("train")))
    res = {}
    for method, extra in (("crt", {"smote": 3}), ("tau-norm", {})):
        # the source named by version: "bundles/digits" would resolve to the newest (cRT's)
        res[method] = rebalance_classifier(RebalanceConfig(
            bundle=str(src), data=tiny_digits, method=method, epochs=3, num_actors=1, **extra))
    _, before = load_bundle(src)
    for method, version in (("crt", "v2"), ("tau-norm", "v3")):
        new_dir = Path(res[method]["bundle"])
        assert new_dir.name == version  # a new version; v1 untouched
        meta, after = load_bundle(new_dir)
        assert set(after) == set(before)
        for key in before:  # the backbone is bit-identical; only the head may change
            if not key.startswith("fc."):
                assert torch.equal(after[key], before[key]), key
        info = json.loads((new_dir / "bundle.json").read_text())["hyperparameters"]["rebalance"]
        assert info["method"] == method and info["source_bundle"]["version"] == 1
        assert meta.metrics.val["balanced_accuracy"] == res[method]["val"]["balanced_accuracy"]
    assert not torch.equal(load_bundle(Path(res["crt"]["bundle"]))[1]["fc.weight"],
                           before["fc.weight"])
    smote = res["crt"]["rebalance"]["smote"]
    assert smote["rows_after"] > smote["rows_before"]
    assert all(c["real"] + c["synthetic"] + c["duplicated"] >= c["real"]
               for c in smote["per_class"])


def _in_process_features(candidate, data_root, splits, **kw):
    """The candidate's real forward_features on every image of the splits, without Ray."""
    from imgpipe.constants import ID, IMAGE, LABEL
    from imgpipe.data.shards import load_manifest, read_split_table
    from imgpipe.data.transforms import decode_image, normalize
    from imgpipe.transfer.candidate import load_candidate
    from imgpipe.transfer.features import Features

    cand = load_candidate(candidate, load_manifest(data_root).preprocess(kw.get("image_size", 32)))
    out = {}
    for split in splits:
        t = read_split_table(data_root, split)
        x = normalize(torch.from_numpy(np.stack([decode_image(b, cand.preprocess)
                                                 for b in t[IMAGE].to_pylist()])), cand.preprocess)
        f, z = cand.forward_features(x)
        out[split] = Features(f.numpy(), t[LABEL].to_numpy().astype(np.int64),
                              [str(i) for i in t[ID].to_pylist()], z.numpy(), 0)
    return out


def test_crt_keeps_the_backbone_bit_identical_without_ray(tiny_digits, tmp_path, monkeypatch):
    """Fast lane of the stage test above: features computed in-process by the same candidate
    code, everything else (head, staging, verification, publishing) real."""
    import imgpipe.decoupled.stage as stage
    from imgpipe.bundle import load_bundle, save_bundle
    from imgpipe.data.shards import load_manifest
    from imgpipe.models import create_model

    monkeypatch.setattr(stage, "extract_splits", _in_process_features)
    manifest = load_manifest(tiny_digits)
    pre = manifest.preprocess(16)
    torch.manual_seed(1)
    net = create_model("cnn", len(manifest.class_names), in_channels=1).eval()
    src = save_bundle(tmp_path, "d", net.state_dict(),
                      architecture={"model": "cnn", "num_classes": len(manifest.class_names),
                                    "in_channels": 1}, preprocess=pre,
                      class_names=list(manifest.class_names),
                      train_class_counts=list(manifest.counts_vector("train")))
    res = stage.rebalance_classifier(RebalanceConfig(bundle=str(src), data=tiny_digits,
                                                     method="crt", smote=2, epochs=2))
    _, before = load_bundle(src)
    _, after = load_bundle(res["bundle"])
    assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith("fc."))
    assert not torch.equal(after["fc.weight"], before["fc.weight"])
    assert Path(res["bundle"]).name == "v2" and res["val"]["verification"]["max_abs_diff"] <= 1e-9
