"""Corruptions (torchvision v2 ops) and robustness scoring through the serving Predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imgpipe.robustness import (
    CORRUPTIONS,
    SEVERITIES,
    corrupt,
    evaluate_robustness,
    robustness_rows,
)


def _images(n=6, size=16, channels=1):
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(n, channels, size, size, dtype=torch.uint8)
    base[:, :, 4:12, 4:12] = torch.randint(120, 255, (n, channels, 8, 8), generator=g,
                                           dtype=torch.uint8)
    return base


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_corruption_keeps_shape_dtype_is_seeded_and_grows_with_severity(name):
    x = _images()
    dist = []
    for s in SEVERITIES:
        a = corrupt(x, name, s, torch.Generator().manual_seed(1))
        b = corrupt(x, name, s, torch.Generator().manual_seed(1))
        assert a.shape == x.shape and a.dtype == torch.uint8
        assert torch.equal(a, b)  # same seed, same corruption
        dist.append((a.float() - x.float()).abs().mean().item())
    assert dist[0] > 0, f"{name} at severity 1 changed nothing"
    assert dist[0] <= dist[1] <= dist[2] or name == "occlusion", dist


def test_occlusion_blacks_out_a_square_of_the_requested_size():
    x = torch.full((1, 1, 20, 20), 200, dtype=torch.uint8)
    out = corrupt(x, "occlusion", 2, torch.Generator().manual_seed(0))  # 25% of the side
    assert int((out == 0).sum()) == 5 * 5


def test_unknown_corruption_and_severity_are_refused():
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(_images(), "fog", 1, torch.Generator())
    with pytest.raises(ValueError, match="severity"):
        corrupt(_images(), "blur", 4, torch.Generator())


def test_evaluate_robustness_on_real_shards(tiny_digits, tmp_path):
    from helpers import make_test_bundle

    from imgpipe.data.shards import load_manifest
    from imgpipe.inference import Predictor

    manifest = load_manifest(tiny_digits)
    path = make_test_bundle(tmp_path, num_classes=len(manifest.class_names), image_size=16)
    result = evaluate_robustness(Predictor.load(path), tiny_digits, "test",
                                 corruptions=("blur", "occlusion"))
    assert result["num_rows"] == 100 and set(result["corruptions"]) == {"blur", "occlusion"}
    for by_sev in result["corruptions"].values():
        for s in SEVERITIES:
            m = by_sev[str(s)]
            assert 0.0 <= m["balanced_accuracy"] <= 1.0 and len(m["per_class_recall"]) == 10
            assert m["balanced_accuracy"] == pytest.approx(np.mean(m["per_class_recall"]))
    assert len(robustness_rows(result)) == 3
    again = evaluate_robustness(Predictor.load(path), tiny_digits, "test",
                                corruptions=("blur", "occlusion"))
    assert again["corruptions"] == result["corruptions"]
