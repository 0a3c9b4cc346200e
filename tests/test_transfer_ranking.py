"""Candidates, Ray Data feature extraction and the ranking job, on a real local Ray instance."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from imgpipe.data.transforms import Preprocess
from imgpipe.models import create_model
from imgpipe.transfer.candidate import CandidateError, load_candidate

TARGET = Preprocess(image_size=16, mode="L", mean=(0.5,), std=(0.25,))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, str]:
    """A bundle, a weights file, and three broken candidates."""
    from helpers import make_test_bundle

    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(1)
    weights = root / "cnn5.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("cnn", 5, 1).state_dict().items()},
              str(weights))
    corrupt = root / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00not safetensors" * 8)
    bundle = make_test_bundle(root / "bundles", num_classes=4, image_size=16)
    return {"bundle": str(bundle), "file": f"cnn={weights}", "random": "random:cnn",
            "missing": str(root / "nope"), "mismatch": f"resnet18={weights}",
            "corrupt": f"cnn={corrupt}"}


def test_bad_candidates_raise_candidate_error_with_the_reason(zoo):
    with pytest.raises(CandidateError, match="no such file"):
        load_candidate(zoo["missing"], TARGET)
    with pytest.raises(CandidateError, match="do not fit architecture 'resnet18'"):
        load_candidate(zoo["mismatch"], TARGET)
    with pytest.raises(CandidateError, match="corrupt or unreadable"):
        load_candidate(zoo["corrupt"], TARGET)
    with pytest.raises(CandidateError, match="needs its architecture"):
        load_candidate(zoo["file"].split("=", 1)[1], TARGET)


def test_candidate_features_are_the_head_input(zoo):
    cand = load_candidate(zoo["bundle"], TARGET)
    assert cand.kind == "bundle" and cand.has_source_head and cand.source_classes == 4
    x = torch.randn(3, 1, 16, 16)
    feats, logits = cand.forward_features(x)
    assert feats.shape == (3, 128) and logits.shape == (3, 4)
    with torch.no_grad():
        assert torch.allclose(cand.model.fc(feats), logits, atol=1e-5)
    assert not load_candidate(zoo["random"], TARGET).has_source_head


def test_torchvision_weights_name_is_a_candidate_read_from_the_local_cache(tmp_path,
                                                                           monkeypatch):
    """Offline: a mobilenet_v3_small state dict written where torchvision's
    own loader looks ($TORCH_HOME/hub/checkpoints) is ranked like any other candidate."""
    import torchvision

    from imgpipe.models import forward_features

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    spec = "mobilenet_v3_small.IMAGENET1K_V1"
    with pytest.raises(CandidateError, match=r"(?s)mobilenet_v3_small-047dcff4\.pth.*python -c"):
        load_candidate(spec, TARGET)  # not cached: the path and the fetch command, no download
    torch.manual_seed(0)
    reference = torchvision.models.mobilenet_v3_small(weights=None).eval()
    path = tmp_path / "home" / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    cand = load_candidate(spec, TARGET)
    assert (cand.kind, cand.architecture, cand.has_source_head, cand.source_classes) == (
        "torchvision", "mobilenet_v3_small", True, 1000)
    assert cand.preprocess.mode == "RGB" and cand.preprocess.image_size == 224
    x = torch.randn(2, 3, 64, 64)
    feats, logits = cand.forward_features(x)
    with torch.no_grad():
        assert torch.allclose(logits, reference(x), atol=1e-5)  # the same network, strictly
    assert torch.allclose(feats, forward_features(cand.model, x), atol=1e-6)
    assert feats.shape == (2, 1024)


def test_a_weights_file_of_another_architecture_is_named(zoo):
    with pytest.raises(CandidateError, match="unknown architecture 'resnet9'"):
        load_candidate(zoo["file"].replace("cnn=", "resnet9="), TARGET)


@pytest.mark.ray
def test_extract_features_matches_a_direct_forward_pass(ray_session, tiny_digits, zoo):
    from imgpipe.constants import ID, IMAGE, TRAIN
    from imgpipe.data.shards import read_split_table
    from imgpipe.data.transforms import decode_image, normalize
    from imgpipe.transfer.features import extract_features

    feats = extract_features(zoo["bundle"], tiny_digits, TRAIN, cpus_per_actor=0.5)
    table = read_split_table(tiny_digits, TRAIN)
    assert feats.features.dtype == np.float32 and feats.features.shape == (table.num_rows, 128)
    assert feats.ids == sorted(feats.ids) and feats.skipped == 0
    order = {i: k for k, i in enumerate(table[ID].to_pylist())}
    rows = [order[i] for i in feats.ids]
    images = table[IMAGE].to_pylist()
    cand = load_candidate(zoo["bundle"], TARGET)
    x = normalize(torch.from_numpy(np.stack([decode_image(images[r], cand.preprocess)
                                             for r in rows])), cand.preprocess)
    direct, logits = cand.forward_features(x)
    assert np.allclose(feats.features, direct.numpy(), atol=1e-4)
    assert np.allclose(feats.source_logits, logits.numpy(), atol=1e-4)
    assert np.array_equal(feats.labels, table["label"].to_numpy()[rows])


@pytest.mark.ray
@pytest.mark.slow
def test_rank_job_end_to_end_with_bad_candidates(ray_session, tiny_digits, zoo, tmp_path,
                                                 capsys):
    spec = importlib.util.spec_from_file_location(
        "rank_checkpoints_job", Path(__file__).resolve().parents[1] / "jobs" / "rank_checkpoints.py")
    rank_checkpoints = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rank_checkpoints)

    good = [zoo["bundle"], zoo["file"], zoo["random"]]
    bad = [zoo["missing"], zoo["mismatch"], zoo["corrupt"]]
    finetuned = tmp_path / "finetuned.json"
    finetuned.write_text(json.dumps({zoo["bundle"]: 0.5, zoo["file"]: 0.4, zoo["random"]: 0.2}))
    out = tmp_path / "rank"
    code = rank_checkpoints.main(["--data", tiny_digits, "--candidates", *good, *bad, "--out",
                                  str(out), "--finetuned", str(finetuned),
                                  "--cpus-per-actor", "0.5", "--image-size", "16"])
    assert code == 0
    doc = json.loads((out / "ranking.json").read_text())
    rows = {r["candidate"]: r for r in doc["candidates"]}
    assert [rows[c]["status"] for c in good] == ["ok"] * 3
    assert sorted(rows[c]["rank"] for c in good) == [1, 2, 3]
    assert "no such file" in rows[zoo["missing"]]["reason"]
    assert "do not fit" in rows[zoo["mismatch"]]["reason"]
    assert "corrupt" in rows[zoo["corrupt"]]["reason"]
    assert all(rows[c]["rank"] is None for c in bad)
    assert rows[zoo["random"]]["scores"]["leep"] is None
    assert rows[zoo["bundle"]]["scores"]["leep"] < 0
    primary = [rows[c]["scores"][doc["primary"]] for c in good]
    ranked = sorted(good, key=lambda c: rows[c]["rank"])
    assert [rows[c]["scores"][doc["primary"]] for c in ranked] == sorted(primary, reverse=True)
    assert set(doc["kendall_tau"]) >= {"logme", "linear_probe_balanced"}
    assert (out / "scores.png").stat().st_size > 0
    assert (out / "scores_vs_finetuned.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "FAILED" in printed and "Kendall" in printed
