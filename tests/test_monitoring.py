"""Monitoring: label-shift estimators, the drift test's null distribution, the log reader's
handling of bad files, the monitor job end to end on a real log, and the active-learning queue."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_test_bundle
from scipy.stats import kstest

from imgpipe.config.specs import parse_window
from imgpipe.monitoring.drift import mmd_permutation_test
from imgpipe.monitoring.label_shift import (
    bbse_prior,
    confusion_given_label,
    em_prior,
    prior_unchanged_test,
    recalibrate,
    reference_temperature,
    total_variation,
)
from imgpipe.monitoring.log_reader import read_window
from imgpipe.monitoring.reference import stratified_sample
from imgpipe.prediction_log_format import MONITOR_DIR, MONITOR_STATUS_FILE

C = 4
SOURCE = np.array([0.4, 0.3, 0.2, 0.1])
MEANS = np.arange(C) * 2.5


def _synthetic(prior: np.ndarray, n: int, rng: np.random.Generator):
    """Labels and exact posteriors under SOURCE for 1-D Gaussian classes (calibrated by
    construction)."""
    y = rng.choice(C, n, p=prior)
    x = rng.normal(MEANS[y], 1.0)
    lik = np.exp(-0.5 * (x[:, None] - MEANS[None]) ** 2) * SOURCE
    return y, lik / lik.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("target", [[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1],
                                    [0.05, 0.05, 0.1, 0.8]])
def test_bbse_and_em_recover_a_known_prior(target):
    rng = np.random.default_rng(0)
    yv, pv = _synthetic(np.full(C, 0.25), 8000, rng)
    _, pt = _synthetic(np.asarray(target), 8000, rng)
    m = confusion_given_label(yv, pv.argmax(1), C)
    assert total_variation(bbse_prior(m, pt.argmax(1)), target) < 0.04
    assert total_variation(em_prior(pt, SOURCE), target) < 0.03


def _overconfident(p: np.ndarray, power: float = 3.0) -> np.ndarray:
    """What an uncalibrated network logs: softmax(power · log p), sharper than the truth."""
    q = p ** power
    return q / q.sum(axis=1, keepdims=True)


def test_em_on_overconfident_probabilities_is_fixed_by_the_reference_temperature():
    rng = np.random.default_rng(3)
    target = np.array([0.05, 0.05, 0.1, 0.8])
    # The reference is a val split with its own (balanced) class mix, under SOURCE's posteriors.
    y_ref, p_ref = _synthetic(np.full(C, 0.25), 8000, rng)
    _, p_win = _synthetic(target, 8000, rng)
    assert abs(reference_temperature(p_ref, y_ref, SOURCE) - 1.0) < 0.05  # calibrated: ≈ 1
    sharp_ref, sharp_win = _overconfident(p_ref), _overconfident(p_win)
    naive = total_variation(em_prior(sharp_win, SOURCE), target)
    t = reference_temperature(sharp_ref, y_ref, SOURCE)
    assert 2.5 < t < 3.5  # undoes the power of 3
    fixed = total_variation(em_prior(recalibrate(sharp_win, t), SOURCE), target)
    assert fixed < 0.03 < naive
    assert (recalibrate(sharp_win, t).argmax(1) == sharp_win.argmax(1)).all()
    np.testing.assert_allclose(recalibrate(sharp_win, t).sum(1), 1.0)


def test_a_pushed_temperature_is_not_applied_twice_on_the_next_pass(tmp_path):
    """Pass 1 reads rows logged at T = 1 by an overconfident model and finds T' ≈ 3; after
    --apply-prior the app logs at T = 3. Pass 2 must estimate the same prior from those rows."""
    from imgpipe.bundle import load_bundle_meta
    from imgpipe.monitoring.analyze import AnalysisSettings, analyze
    from imgpipe.monitoring.log_reader import LogWindow
    from imgpipe.monitoring.reference import Reference

    rng = np.random.default_rng(5)
    meta = load_bundle_meta(make_test_bundle(tmp_path, num_classes=C,
                                             train_class_counts=[40, 30, 20, 10]))
    y_ref, p_ref = _synthetic(np.full(C, 0.25), 4000, rng)
    _, p_win = _synthetic(np.array([0.1, 0.2, 0.3, 0.4]), 3000, rng)
    ref = Reference(y_ref, _overconfident(p_ref), None, {"temperature": 1.0})
    settings = AnalysisSettings(n_bootstrap=0, seed=0)

    def window(probs, temperature):
        n = len(probs)
        return LogWindow(np.arange(n).astype("datetime64[us]"), probs.argmax(1), probs,
                         probs.max(1), np.zeros(n), np.zeros(n), None,
                         temperatures=np.full(n, temperature))

    sharp = _overconfident(p_win)
    first = analyze(meta, ref, window(sharp, 1.0), settings)["label_shift"]
    t_cal = first["em_recalibration"]["calibrated_temperature"]
    assert 2.5 < t_cal < 3.5 and first["em_recalibration"]["served_temperature"] == 1.0
    second = analyze(meta, ref, window(recalibrate(sharp, t_cal), t_cal), settings)["label_shift"]
    assert second["em_recalibration"]["served_temperature"] == pytest.approx(t_cal, rel=1e-5)
    for k in first["em"]["prior"]:
        assert second["em"]["prior"][k] == pytest.approx(first["em"]["prior"][k], abs=1e-4)


def test_prior_test_holds_level_and_detects_shift():
    rng = np.random.default_rng(1)
    p_null, p_alt = [], []
    for _ in range(200):
        _, ref = _synthetic(SOURCE, 400, rng)
        _, same = _synthetic(SOURCE, 300, rng)
        _, moved = _synthetic(SOURCE[::-1], 300, rng)
        p_null.append(prior_unchanged_test(same.argmax(1), ref.argmax(1), C)[1])
        p_alt.append(prior_unchanged_test(moved.argmax(1), ref.argmax(1), C)[1])
    assert np.mean(np.array(p_null) < 0.05) < 0.09  # level 0.05, 200 draws: sd 0.015
    assert np.mean(np.array(p_alt) < 0.05) > 0.95


def test_drift_p_value_is_uniform_under_no_shift_and_small_under_shift():
    rng = np.random.default_rng(2)
    ps = [mmd_permutation_test(rng.normal(size=(60, 8)), rng.normal(size=(90, 8)),
                               n_permutations=99, seed=i).p_value for i in range(60)]
    # Seeded: deterministic. Permutation p-values live on {1/100, ..., 1}: uniform-ish.
    assert kstest(ps, "uniform").pvalue > 0.01
    shifted = mmd_permutation_test(rng.normal(size=(60, 8)) + 0.6, rng.normal(size=(90, 8)),
                                   n_permutations=99)
    assert shifted.p_value <= 0.02


def test_stratified_sample_follows_the_prior_without_repeats():
    labels = np.repeat(np.arange(3), [100, 100, 100])
    idx = stratified_sample(labels, np.array([0.5, 0.3, 0.2]), seed=0)
    assert len(set(idx)) == len(idx) == 200
    assert np.bincount(labels[idx]).tolist() == [100, 60, 40]


def test_active_learning_quota_keeps_rare_predicted_classes():
    from imgpipe.monitoring.actions import select_informative
    from imgpipe.monitoring.log_reader import LogWindow

    predicted = np.array([0] * 50 + [1] * 5 + [2] * 2)
    margin = np.random.default_rng(0).random(len(predicted)) * np.where(predicted == 0, 0.1, 1)
    z = np.zeros(len(predicted))
    win = LogWindow(z.astype("datetime64[us]"), predicted, np.zeros((len(z), 3)), z, margin,
                    -margin, None)
    chosen = select_informative(win, 12, "margin")
    # Class 0 has the 50 lowest margins; without a quota it would take all 12 slots.
    assert np.bincount(predicted[chosen], minlength=3).tolist() == [6, 4, 2]
    for c in (0, 1):
        mine = np.flatnonzero(predicted == c)
        best = mine[np.argsort(margin[mine])][: np.sum(predicted[chosen] == c)]
        assert set(best) == set(chosen[predicted[chosen] == c])


def test_parse_window():
    assert parse_window("500").rows == 500
    assert parse_window("1h").duration.total_seconds() == 3600
    with pytest.raises(ValueError, match="duration like"):
        parse_window("1 hour")


# ----- a real log, written by the app's logger -------------------------------------------------


def _write_log(location: Path, bundle: Path, n_batches: int = 6, seed: int = 0) -> int:
    from imgpipe.inference import Predictor
    from imgpipe.monitoring.reference import penultimate_and_logits
    from serving.prediction_log import PredictionLogger, PredictionLogSettings

    pred = Predictor.load(bundle)
    gen = torch.Generator().manual_seed(seed)
    logger = PredictionLogger(PredictionLogSettings(location=str(location), images=True,
                                                    flush_interval_s=3600), replica="t")
    rows = 0
    for _ in range(n_batches):
        x = torch.randn(16, 1, 16, 16, generator=gen)
        logits, emb = penultimate_and_logits(pred, x)
        logger.record(torch.from_numpy(logits), torch.from_numpy(emb), pred.meta, x)
        logger.flush()  # one part file per batch
        rows += 16
    logger.close()
    return rows


def test_corrupt_and_half_written_files_are_skipped_and_counted(tmp_path):
    bundle = make_test_bundle(tmp_path / "b", num_classes=3, mode="L")
    log = tmp_path / "log"
    rows = _write_log(log, bundle)
    parts = sorted(log.glob("part-*.parquet"))
    half = parts[0].read_bytes()
    # A truncated copy (a writer killed mid-file) and garbage, both named like part files.
    (log / parts[0].name.replace("-000000", "-900000")).write_bytes(half[: len(half) // 2])
    (log / parts[1].name.replace("-000001", "-900001")).write_bytes(b"not parquet at all")
    (log / "_tmp-part-whatever.parquet").write_bytes(b"in progress")  # never read
    win = read_window(str(log), parse_window("1d"), "test-model", "1", 3)
    assert len(win) == rows and win.files_read == len(parts)
    assert len(win.files_skipped) == 2
    assert win.embeddings.shape == (rows, 128)


def test_monitor_job_end_to_end_and_active_learning_manifest(tmp_path, tiny_digits):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import monitor as monitor_job

    from imgpipe.data.sources import list_manifest

    bundle = make_test_bundle(tmp_path / "b", num_classes=10, mode="L",
                              train_class_counts=[100, 60, 36, 22, 13, 8, 5, 3, 2, 1])
    log = tmp_path / "log"
    _write_log(log, bundle)
    (log / "part-20990101T000000000000Z-x-000000.parquet").write_bytes(b"PAR1 torn")
    out = tmp_path / "monitor"
    assert monitor_job.main(["--bundle", str(bundle), "--init-reference", tiny_digits]) == 0
    code = monitor_job.main(["--bundle", str(bundle), "--log", str(log), "--window", "1d",
                             "--out", str(out), "--bootstrap", "20", "--permutations", "99",
                             "--active-learning", "12"])
    assert code == 0
    result = json.loads((out / "monitor.json").read_text())
    assert result["window"]["rows"] == 96 and len(result["window"]["files_skipped"]) == 1
    for method in ("em", "bbse"):
        assert abs(sum(result["label_shift"][method]["prior"].values()) - 1) < 1e-4
    assert 0 <= result["drift"]["p_value"] <= 1
    assert "<img" in (out / "monitor.html").read_text()
    status = json.loads((log / MONITOR_DIR / MONITOR_STATUS_FILE).read_text())
    assert set(status["estimated_prior"]) == {"em", "bbse"}
    # The queue: 12 rows, a quota per predicted class, images on disk.
    al = result["active_learning"]
    assert al["rows"] == 12 and al["with_images"] == 12
    win = read_window(str(log), parse_window("1d"), "test-model", "1", 10)
    assert set(al["per_predicted_class"]) == {f"class_{i}" for i in np.unique(win.predicted)}
    manifest = out / "active_learning" / "manifest.csv"
    lines = manifest.read_text().splitlines()
    filled = [lines[0]] + [line.replace(",,", ",class_0,", 1) for line in lines[1:]]
    manifest.write_text("\n".join(filled) + "\n")
    items = list_manifest(str(manifest)).items
    assert len(items) == 12 and Path(items[0].location).is_file()
    # A bad flag fails before any work with the field's name.
    assert monitor_job.main(["--bundle", str(bundle), "--log", str(log), "--window", "x"]) == 2
    shutil.rmtree(out)
