"""The report: one self-contained HTML page (every figure embedded, no URL), the PNGs, the
model card in the bundle, and the evaluate job end to end."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from helpers import make_test_bundle
from test_evaluate import write_tiny_shards

from imgpipe.bundle import load_bundle_meta
from imgpipe.constants import MACRO_F1, TEST, VAL
from imgpipe.evaluate import METRICS_FILE, PREDICTIONS_FILE
from imgpipe.report import MODEL_CARD_FILE, REPORT_FILE, document_bundle, write_report

HISTORY = [{"epoch": e, "train_loss": 2.0 / (e + 1), "val_loss": 2.2 / (e + 1) + 0.1,
            "val_macro_f1": 0.2 + 0.1 * e, "val_balanced_accuracy": 0.25 + 0.1 * e}
           for e in range(5)]
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return write_tiny_shards(tmp_path_factory.mktemp("report") / "data")


def _check_self_contained(page: str, n_figures: int) -> None:
    images = IMG.findall(page)
    assert len(images) == n_figures
    for b64 in images:
        assert base64.b64decode(b64).startswith(b"\x89PNG\r\n\x1a\n")
    assert not re.search(r"https?://", page)
    assert "<link" not in page and "<script" not in page and "url(" not in page
    assert len(re.findall(r"<img ", page)) == n_figures  # nothing else is loaded


def test_report_with_history(data, tmp_path):
    bundle = make_test_bundle(tmp_path / "b", num_classes=4, train_class_counts=[600, 60, 25, 3])
    out = tmp_path / "report"
    path = document_bundle(bundle, data, out, history=HISTORY)
    assert path == out / REPORT_FILE
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["confusion_matrix.png", "per_class_vs_frequency.png", "reliability.png",
                    "roc_pr_curves.png", "training_curves.png"]
    page = path.read_text()
    _check_self_contained(page, len(pngs))
    for text in ("Macro F1", "Geometric mean", "Expected calibration error", "class_3",
                 "Per class", "before (T = 1)"):
        assert text in page
    assert (out / METRICS_FILE).is_file() and (out / PREDICTIONS_FILE).is_file()
    # Calibrated and recorded in the bundle, with the model card and report beside it.
    meta = load_bundle_meta(bundle)
    assert meta.temperature != 1.0
    assert MACRO_F1 in meta.metrics.test and MACRO_F1 in meta.metrics.val
    assert (bundle / REPORT_FILE).read_text() == page
    card = (bundle / MODEL_CARD_FILE).read_text()
    for heading in ("## Model", "## Data", "## Metrics", "## Calibration", "## Limitations"):
        assert heading in card
    assert "class_3 (3)" in card  # the few-shot class is named with its training count


def test_report_without_history_or_calibration_under_another_prior(data, tmp_path):
    bundle = make_test_bundle(tmp_path / "b", num_classes=4, train_class_counts=[600, 60, 25, 3])
    out = tmp_path / "report"
    page = write_report(bundle, data, out, split=VAL, prior="balanced").read_text()
    _check_self_contained(page, 4)
    assert "No training history" in page
    meta = load_bundle_meta(bundle)
    assert meta.temperature == 1.0 and not meta.metrics.val  # nothing recorded under override
    assert not (bundle / REPORT_FILE).exists()
    assert json.loads((out / METRICS_FILE).read_text())["deployment_prior"] == "balanced"


def test_names_from_the_data_are_escaped_in_the_page(tmp_path):
    names = ["cat", "dog", "<i>rare & odd</i>", "a\"b"]
    data = write_tiny_shards(tmp_path / "data", names=names)
    bundle = make_test_bundle(tmp_path / "b", num_classes=4, class_names=names,
                              train_class_counts=[600, 60, 25, 3])
    page = write_report(bundle, data, tmp_path / "report").read_text()
    assert "<i>" not in page and "&lt;i&gt;rare &amp; odd&lt;/i&gt;" in page
    assert "a&#34;b" in page
    _check_self_contained(page, 4)
    # write_report only writes its output folder: the bundle is left as it was
    assert not (bundle / REPORT_FILE).exists() and not load_bundle_meta(bundle).metrics.test


def _evaluate_job():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "evaluate_job", Path(__file__).parents[1] / "jobs" / "evaluate.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def test_evaluate_job_end_to_end(data, tmp_path, capsys):
    job = _evaluate_job()
    bundle = make_test_bundle(tmp_path / "b", num_classes=4, train_class_counts=[600, 60, 25, 3])
    out = tmp_path / "eval"
    rc = job.main(["--bundle", str(bundle), "--data", data, "--split", TEST, "--out", str(out),
                   "--calibrate", "--prior", "balanced", "--many-threshold", "50",
                   "--few-threshold", "10"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Balanced accuracy" in printed and "class_3" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["calibration"]["temperature"] == load_bundle_meta(bundle).temperature
    assert results["evaluated"]["shot_thresholds"] == {"many": 50, "few": 10}
    assert load_bundle_meta(bundle).deployment_prior == "balanced"  # stored with --calibrate
    assert (out / REPORT_FILE).is_file() and (bundle / "model_card.md").is_file()
    assert job.main(["--bundle", str(bundle), "--data", data, "--out", str(out),
                     "--prior", "nonsense"]) == 2


def test_report_with_robustness_has_its_table_plot_and_card_line(data, tmp_path):
    bundle = make_test_bundle(tmp_path / "b", num_classes=4, train_class_counts=[600, 60, 25, 3])
    out = tmp_path / "report"
    page = document_bundle(bundle, data, out, robustness=True, robustness_seed=1).read_text()
    _check_self_contained(page, 5)  # four figures + the robustness plot
    rob = json.loads((out / "robustness.json").read_text())
    assert (out / "robustness.png").is_file() and rob["seed"] == 1
    assert "Robustness under corruptions" in page
    for name in ("gaussian_noise", "blur", "jpeg", "brightness", "contrast", "rotation",
                 "occlusion"):
        assert name in page
    mean = f"{rob['mean_corrupted_balanced_accuracy']:.4f}"
    assert mean in page
    card = (bundle / MODEL_CARD_FILE).read_text()
    assert "## Robustness" in card and mean in card


@pytest.mark.parametrize("report", [True, False])
def test_evaluate_job_robustness_with_and_without_the_report(data, tmp_path, capsys, report):
    job = _evaluate_job()
    bundle = make_test_bundle(tmp_path / "b", num_classes=4, train_class_counts=[600, 60, 25, 3])
    out = tmp_path / "eval"
    flags = [] if report else ["--no-report"]
    assert job.main(["--bundle", str(bundle), "--data", data, "--out", str(out),
                     "--robustness", *flags]) == 0
    printed = capsys.readouterr().out
    assert "Robustness on test" in printed and "occlusion" in printed
    results = json.loads((out / "results.json").read_text())
    assert Path(results["robustness"]["plot"]).is_file()
    assert ("Robustness under corruptions" in (out / REPORT_FILE).read_text()) if report else (
        not (out / REPORT_FILE).exists())
