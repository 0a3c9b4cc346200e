"""Temperature scaling, prior correction and the binary decision threshold, by hand and on
synthetic logits (pure numpy; no model, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_test_bundle
from sklearn.metrics import log_loss

from imgpipe.bundle import load_bundle_meta
from imgpipe.calibrate import choose_threshold, fit_temperature, nll_at_temperature
from imgpipe.inference import Predictor, adjusted_probabilities, prior_shift
from imgpipe.metrics import calibration


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _calibrated_logits(n: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true label distribution (labels are drawn from it)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, size=(n, c))
    p = _softmax(z)
    y = np.array([rng.choice(c, p=row) for row in p])
    return z, y


def test_nll_matches_sklearn_log_loss():
    z, y = _calibrated_logits(300, 4, seed=0)
    for t in (0.5, 1.0, 3.0):
        assert nll_at_temperature(z, y, t) == pytest.approx(
            log_loss(y, _softmax(z / t), labels=range(4)), rel=1e-9)


@pytest.mark.parametrize("scale, expect", [(8.0, "above"), (0.25, "below")])
def test_temperature_undoes_over_and_under_confidence(scale, expect):
    z, y = _calibrated_logits(4000, 5, seed=1)
    t = fit_temperature(z * scale, y)
    # The data were generated at scale 1, so the fitted T should approximately undo ``scale``.
    assert t == pytest.approx(scale, rel=0.15)
    assert (t > 1) if expect == "above" else (t < 1)
    before = nll_at_temperature(z * scale, y, 1.0)
    after = nll_at_temperature(z * scale, y, t)
    assert after < before - 0.05
    ece_before = calibration(y, _softmax(z * scale))["ece"]
    ece_after = calibration(y, _softmax(z * scale / t))["ece"]
    assert ece_after < ece_before


@pytest.mark.parametrize("seed", range(5))
def test_temperature_never_raises_nll_nor_changes_accuracy(seed):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(20, 200)), int(rng.integers(2, 12))
    z = rng.normal(0, rng.uniform(0.1, 10), size=(n, c))
    y = rng.integers(0, c, size=n)  # labels unrelated to the logits
    t = fit_temperature(z, y)
    assert t > 0
    assert nll_at_temperature(z, y, t) <= nll_at_temperature(z, y, 1.0)
    assert np.array_equal((z / t).argmax(1), z.argmax(1))
    assert fit_temperature(z, y) == t  # deterministic


def test_temperature_with_prior_shift_never_changes_argmax_of_the_shifted_logits():
    z, y = _calibrated_logits(500, 3, seed=2)
    shift = np.log([0.2, 0.3, 0.5])
    t = fit_temperature(3 * z, y, shift)
    assert nll_at_temperature(3 * z, y, t, shift) < nll_at_temperature(3 * z, y, 1.0, shift)


def test_fit_temperature_rejects_bad_input():
    with pytest.raises(ValueError, match="logits"):
        fit_temperature(np.zeros(5), np.zeros(5, int))
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(np.zeros((5, 3)), np.full(5, 3))
    with pytest.raises(ValueError, match="finite"):
        fit_temperature(np.full((2, 2), np.nan), np.zeros(2, int))


def test_prior_correction_to_balanced_by_hand(tmp_path):
    # Model prior q = (0.7, 0.2, 0.1); equal logits mean "the model sees only its prior", so
    # under a balanced deployment prior p_c ∝ (1/3) / q_c: (1/0.7, 5, 10) normalised.
    bundle = make_test_bundle(tmp_path, num_classes=3, train_class_counts=[70, 20, 10],
                              model_prior=[0.7, 0.2, 0.1], deployment_prior="balanced",
                              temperature=2.0)
    meta = load_bundle_meta(bundle)
    expected = np.array([1 / 0.7, 5.0, 10.0])
    expected /= expected.sum()
    probs = adjusted_probabilities(np.zeros((1, 3)), meta)
    np.testing.assert_allclose(probs[0], expected, rtol=1e-12)
    # Temperature acts before the shift: logits (2, 0, 0) at T = 2 are (1, 0, 0).
    z = np.array([[2.0, 0.0, 0.0]])
    by_hand = np.array([np.e / 0.7, 1 / 0.2, 1 / 0.1])
    np.testing.assert_allclose(adjusted_probabilities(z, meta)[0], by_hand / by_hand.sum(),
                               rtol=1e-12)
    np.testing.assert_allclose(prior_shift(meta), np.log(1 / 3) - np.log([0.7, 0.2, 0.1]))
    assert Predictor.load(bundle).predict_labels(probs).tolist() == [2]


def test_prior_model_and_train_are_identity_for_plain_training(tmp_path):
    bundle = make_test_bundle(tmp_path, num_classes=3, train_class_counts=[70, 20, 10])
    meta = load_bundle_meta(bundle)
    z = np.random.default_rng(0).normal(size=(6, 3))
    plain = adjusted_probabilities(z, meta)  # deployment prior "model": no correction
    np.testing.assert_allclose(plain, _softmax(z), rtol=1e-12)
    train = meta.model_copy(update={"deployment_prior": "train"})
    np.testing.assert_allclose(adjusted_probabilities(z, train), plain, rtol=1e-12)


def test_threshold_by_hand():
    p = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.1])
    y = np.array([1, 1, 0, 1, 0, 0])
    # Cuts after 1..6 items: F1 = 2/4, 4/5, 4/6, 6/7, 6/8, 6/9 → best keeps the top 4,
    # so the threshold lies midway between 0.4 and 0.3.
    assert choose_threshold(p, y) == pytest.approx(0.35)
    # Recall ≥ 0.6 first reached with the top 2 (2/3): midway between 0.8 and 0.7.
    assert choose_threshold(p, y, mode="recall", target_recall=0.6) == pytest.approx(0.75)
    assert choose_threshold(p, y, mode="recall", target_recall=1.0) == pytest.approx(0.35)
    assert ((p >= 0.35) == (p > 0.35)).all()  # midpoints: >= and > agree on these scores


def test_threshold_ties_move_together_and_stay_inside_zero_one():
    p = np.array([0.8, 0.8, 0.2])
    y = np.array([1, 0, 1])
    # Cutting between the tied 0.8s is impossible: F1 is 2/4 above 0.2, 4/5 keeping all.
    assert choose_threshold(p, y) == pytest.approx(0.1)
    t = choose_threshold(np.array([1.0, 1.0]), np.array([1, 1]))
    assert 0 < t < 1


def test_threshold_rejects_bad_input():
    with pytest.raises(ValueError, match="no positive"):
        choose_threshold(np.array([0.2, 0.4]), np.array([0, 0]))
    with pytest.raises(ValueError, match="binary"):
        choose_threshold(np.array([0.2, 0.4]), np.array([0, 2]))
    with pytest.raises(ValueError, match="mode"):
        choose_threshold(np.array([0.2, 0.4]), np.array([0, 1]), mode="f2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target_recall"):
        choose_threshold(np.array([0.2, 0.4]), np.array([0, 1]), "recall", target_recall=0)
