"""Predictor: bundle → model → calibrated, prior-corrected probabilities (the offline path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import encode_image, make_test_bundle
from safetensors.torch import load_file

from imgpipe.bundle import BundleError, load_bundle_meta
from imgpipe.data.transforms import ImageDecodeError, decode_image, normalize
from imgpipe.inference import Predictor, adjusted_probabilities, prior_shift
from imgpipe.models import create_model, list_models


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("name", list_models())
def test_load_every_registered_model(tmp_path, name):
    # 32 px: the smallest side every registered backbone accepts (ConvNeXt downsamples 32x).
    bundle = make_test_bundle(tmp_path, model=name, mode="RGB", image_size=32)
    p = Predictor.load(bundle)
    assert not p.model.training
    probs = p.predict_images([encode_image(0), encode_image(1, size=(40, 30))])
    assert probs.shape == (2, 3) and probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)


def test_predict_images_equals_the_manual_path(tmp_path):
    """Same result as rebuilding by hand: decode → normalise → model → T → prior → softmax."""
    bundle = make_test_bundle(tmp_path, temperature=1.7, deployment_prior="balanced")
    meta = load_bundle_meta(bundle)
    images = [encode_image(i, size=(17 + i, 23)) for i in range(4)]
    model = create_model("cnn", 3, in_channels=1).eval()
    model.load_state_dict(load_file(str(bundle / "model.safetensors")))
    x = normalize(torch.from_numpy(np.stack([decode_image(b, meta.preprocess) for b in images])),
                  meta.preprocess)
    with torch.no_grad():
        logits = model(x).double().numpy()
    prior = np.asarray(meta.model_prior)
    expected = _softmax(logits / 1.7 + np.log(1 / 3) - np.log(prior / prior.sum()))
    np.testing.assert_allclose(Predictor.load(bundle).predict_images(images), expected,
                               rtol=0, atol=1e-6)


def test_order_is_temperature_then_prior(tmp_path):
    bundle = make_test_bundle(tmp_path, train_class_counts=[60, 30, 10], temperature=2.0,
                              deployment_prior=[0.2, 0.3, 0.5])
    p = Predictor.load(bundle)
    z = np.array([[2.0, -1.0, 0.5]])
    by_hand = _softmax(z / 2.0 + np.log([0.2, 0.3, 0.5]) - np.log([0.6, 0.3, 0.1]))
    np.testing.assert_allclose(p.probabilities(torch.tensor(z, dtype=torch.float32)), by_hand,
                               rtol=1e-6)


def test_train_prior_is_identity_for_plain_training(tmp_path):
    p = Predictor.load(make_test_bundle(tmp_path, deployment_prior="train"))
    z = np.random.default_rng(0).normal(size=(5, 3))
    np.testing.assert_allclose(p.probabilities(z), _softmax(z), rtol=1e-12)


def test_zero_prior_entries_give_no_nan(tmp_path):
    bundle = make_test_bundle(tmp_path, train_class_counts=[10, 0, 5], model_prior=[0.5, 0.0, 0.5],
                              deployment_prior=[0.0, 0.5, 0.5])
    meta = load_bundle_meta(bundle)
    shift = prior_shift(meta)
    assert shift[0] == -np.inf and shift[1] == 0.0 and np.isfinite(shift[2])
    probs = adjusted_probabilities(np.random.default_rng(1).normal(size=(4, 3)), meta)
    assert np.isfinite(probs).all() and (probs[:, 0] == 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_set_adjustment_validates_and_applies(tmp_path):
    p = Predictor.load(make_test_bundle(tmp_path))
    z = np.array([[1.0, 0.0, -1.0]])
    p.set_adjustment(temperature=4.0)
    np.testing.assert_allclose(p.probabilities(z), _softmax(z / 4.0))
    with pytest.raises(BundleError, match="deployment_prior"):
        p.set_adjustment(deployment_prior=[1.0, 1.0])
    with pytest.raises(BundleError, match="binary"):
        p.set_adjustment(decision_threshold=0.4)
    assert p.meta.temperature == 4.0 and p.meta.deployment_prior == "model"  # unchanged


def test_binary_threshold_decides(tmp_path):
    p = Predictor.load(make_test_bundle(tmp_path, num_classes=2, decision_threshold=0.2))
    probs = np.array([[0.85, 0.15], [0.75, 0.25], [0.1, 0.9]])
    assert p.predict_labels(probs).tolist() == [0, 1, 1]
    p.set_adjustment(decision_threshold=None)
    assert p.predict_labels(probs).tolist() == [0, 0, 1]


def test_bad_images_and_strict_weights(tmp_path):
    bundle = make_test_bundle(tmp_path)
    p = Predictor.load(bundle)
    with pytest.raises(ImageDecodeError):
        p.predict_images([encode_image(0), b"not an image"])
    assert p.predict_images([]).shape == (0, 3)
    wrong = make_test_bundle(tmp_path / "other", model="resnet18")
    meta_text = (wrong / "bundle.json").read_text().replace('"resnet18"', '"cnn"')
    (wrong / "bundle.json").write_text(meta_text)
    with pytest.raises(RuntimeError, match="state_dict"):
        Predictor.load(wrong)
