"""``write_report``: evaluate a bundle and write its figures, page and model card."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from imgpipe.bundle import resolve_bundle_dir, update_bundle_meta
from imgpipe.calibrate import ThresholdMode
from imgpipe.constants import TEST, VAL
from imgpipe.data.shards import Manifest, load_manifest
from imgpipe.evaluate import (
    BundleEvaluation,
    ShotThresholds,
    bundle_block,
    calibrate_bundle,
    evaluation_payload,
    load_predictor,
    parse_prior,
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


def write_report(bundle_dir: str | Path, data_root: str, out_dir: str | Path,
                 history: list[dict[str, Any]] | None = None, *, split: str = TEST,
                 prior: str | list[float] | None = None,
                 shot_thresholds: ShotThresholds | tuple[int, int] = ShotThresholds(),
                 calibrate: bool = True, threshold_mode: ThresholdMode = "max_f1",
                 target_recall: float = 0.9, robustness: bool = False,
                 robustness_seed: int = 0) -> Path:
    """Evaluate a bundle and write the full report; return the path of ``report.html``.

    Writes into ``out_dir``: ``metrics.json`` + ``predictions.parquet`` (of ``split``), one PNG
    per figure, ``report.html`` (self-contained) and ``model_card.md``. With the bundle's own
    prior (``prior=None``) it also records the val/test metrics in ``bundle.json`` and copies
    ``report.html`` and ``model_card.md`` into the bundle folder.

    Args:
        history: per-epoch dicts (``epoch``, ``train_loss``, ``val_loss``, ``val_macro_f1``, ...)
            for the training curves; None leaves that figure out.
        calibrate: first fit temperature (and binary threshold) on val and store them in the
            bundle (``calibrate_bundle``; deterministic, so re-running changes nothing).
        prior: evaluate under another deployment prior (not recorded in the bundle).
        robustness: also score corrupted copies of ``split`` (``imgpipe.robustness``):
            ``robustness.json``, ``robustness.png``, a report section and a card line.
    Raises:
        BundleError, ManifestError, ValueError: as ``run_evaluation`` / ``calibrate_bundle``.
    """
    bundle = resolve_bundle_dir(bundle_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shots = ShotThresholds(*shot_thresholds)
    prior = parse_prior(prior)
    if calibrate:
        calibrate_bundle(bundle, data_root, threshold_mode=threshold_mode,
                         target_recall=target_recall)
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
    page = render_html(evals, split, figures, shots, data_root, history_missing=not history,
                       robustness=rob)
    report = out / REPORT_FILE
    report.write_text(page, encoding="utf-8")
    card = out / MODEL_CARD_FILE
    card.write_text(render_model_card(main.meta, manifest, evals, split, shots, rob),
                    encoding="utf-8")
    if prior is None:
        recorded = {s: bundle_block(e.metrics) for s, e in evals.items() if s in (VAL, TEST)}
        if recorded:
            update_bundle_meta(bundle, metrics=recorded)
        shutil.copyfile(report, bundle / REPORT_FILE)
        shutil.copyfile(card, bundle / MODEL_CARD_FILE)
    return report
