"""``write_report``: evaluate a bundle and write its figures, page and model card (into an
output folder only; the bundle's own report: ``bundle_docs``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgpipe.bundle import resolve_bundle_dir
from imgpipe.config.specs import parse_prior
from imgpipe.constants import TEST, VAL
from imgpipe.data.manifest import Manifest, load_manifest
from imgpipe.evaluate import (
    BundleEvaluation,
    ShotThresholds,
    evaluation_payload,
    load_predictor,
    run_evaluation,
    write_evaluation,
)
from imgpipe.report.card import render_model_card
from imgpipe.report.figures import write_figures
from imgpipe.report.labels import MODEL_CARD_FILE, REPORT_FILE
from imgpipe.report.page import render_html


def _evaluate_splits(bundle: Path, data_root: str, split: str, prior: Any,
                     shots: ShotThresholds, manifest: Manifest) -> dict[str, BundleEvaluation]:
    """The requested split first, plus val (for the calibration table) when it exists."""
    evals = {split: run_evaluation(bundle, data_root, split, prior, shots)}
    if split != VAL and VAL in manifest.splits and manifest.num_rows[VAL] > 0:
        evals[VAL] = run_evaluation(bundle, data_root, VAL, prior, shots)
    return evals


@dataclass
class ReportFiles:
    """What ``render_report`` wrote, and the evaluations behind it."""

    page: Path  # report.html
    card: Path  # model_card.md
    evaluations: dict[str, BundleEvaluation]  # the requested split first, then val


def write_report(bundle_dir: str | Path, data_root: str, out_dir: str | Path,
                 history: list[dict[str, Any]] | None = None, *, split: str = TEST,
                 prior: str | list[float] | None = None,
                 shot_thresholds: ShotThresholds | tuple[int, int] = ShotThresholds(),
                 robustness: bool = False, robustness_seed: int = 0) -> Path:
    """Evaluate a bundle and write the full report into ``out_dir``; return ``report.html``.

    Only ``out_dir`` is written; the bundle is not touched (its own calibrated, recorded
    report: ``report.bundle_docs.document_bundle``). See ``render_report`` for the files.
    """
    return render_report(bundle_dir, data_root, out_dir, history, split=split, prior=prior,
                         shot_thresholds=shot_thresholds, robustness=robustness,
                         robustness_seed=robustness_seed).page


def render_report(bundle_dir: str | Path, data_root: str, out_dir: str | Path,
                  history: list[dict[str, Any]] | None = None, *, split: str = TEST,
                  prior: str | list[float] | None = None,
                  shot_thresholds: ShotThresholds | tuple[int, int] = ShotThresholds(),
                  robustness: bool = False, robustness_seed: int = 0) -> ReportFiles:
    """Evaluate a bundle as served and write into ``out_dir``: ``metrics.json`` +
    ``predictions.parquet`` (of ``split``), one PNG per figure, ``report.html`` (self-contained)
    and ``model_card.md``.

    Args:
        history: per-epoch dicts (``epoch``, ``train_loss``, ``val_loss``, ``val_macro_f1``, ...)
            for the training curves; None leaves that figure out.
        prior: evaluate under another deployment prior (None: the bundle's own).
        robustness: also score corrupted copies of ``split`` (``imgpipe.robustness``):
            ``robustness.json``, ``robustness.png``, a report section and a card line.
    Raises:
        BundleError, ManifestError, ValueError: as ``run_evaluation``.
    """
    bundle = resolve_bundle_dir(bundle_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shots = ShotThresholds(*shot_thresholds)
    prior = parse_prior(prior)
    manifest = load_manifest(data_root)
    evals = _evaluate_splits(bundle, data_root, split, prior, shots, manifest)
    main = evals[split]
    write_evaluation(main, evaluation_payload(main, bundle, data_root, shots), out)
    figures = write_figures(main, history, out)
    rob = None
    if robustness:
        from imgpipe.robustness import write_robustness

        rob = write_robustness(load_predictor(bundle, prior), data_root, split, out,
                               seed=robustness_seed)
    page = out / REPORT_FILE
    page.write_text(render_html(evals, split, figures, shots, data_root,
                                history_missing=not history, robustness=rob), encoding="utf-8")
    card = out / MODEL_CARD_FILE
    card.write_text(render_model_card(main.meta, manifest, evals, split, shots, rob),
                    encoding="utf-8")
    return ReportFiles(page, card, evals)
