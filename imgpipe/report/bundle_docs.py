"""A bundle's own documentation: calibrated, reported under its own prior, recorded in it.

The one place where reporting edits a bundle. ``write_report`` only writes an output folder;
this calibrates the bundle first (optional), reports under the bundle's own deployment prior,
then records the val/test metrics in ``bundle.json`` and copies ``report.html`` and
``model_card.md`` into the bundle folder, so the published version carries them.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from imgpipe.bundle import resolve_bundle_dir, update_bundle_meta
from imgpipe.calibrate import ThresholdMode
from imgpipe.constants import TEST, VAL
from imgpipe.evaluate import ShotThresholds, bundle_block, calibrate_bundle
from imgpipe.report.labels import MODEL_CARD_FILE, REPORT_FILE
from imgpipe.report.write import render_report


def document_bundle(bundle_dir: str | Path, data_root: str, out_dir: str | Path,
                    history: list[dict[str, Any]] | None = None, *, split: str = TEST,
                    shot_thresholds: ShotThresholds | tuple[int, int] = ShotThresholds(),
                    calibrate: bool = True, threshold_mode: ThresholdMode = "max_f1",
                    target_recall: float = 0.9, robustness: bool = False,
                    robustness_seed: int = 0) -> Path:
    """Calibrate (optional), report into ``out_dir`` and into the bundle; return ``report.html``.

    Args:
        calibrate: first fit temperature (and binary threshold) on val and store them in the
            bundle (``calibrate_bundle``; deterministic, so re-running changes nothing).
        history, split, shot_thresholds, robustness, robustness_seed: as ``render_report``.
    Raises:
        BundleError, ManifestError, ValueError: as ``run_evaluation`` / ``calibrate_bundle``.
    """
    bundle = resolve_bundle_dir(bundle_dir)
    if calibrate:
        calibrate_bundle(bundle, data_root, threshold_mode=threshold_mode,
                         target_recall=target_recall)
    files = render_report(bundle, data_root, out_dir, history, split=split,
                          shot_thresholds=shot_thresholds, robustness=robustness,
                          robustness_seed=robustness_seed)
    recorded = {s: bundle_block(e.metrics) for s, e in files.evaluations.items()
                if s in (VAL, TEST)}
    if recorded:
        update_bundle_meta(bundle, metrics=recorded)
    shutil.copyfile(files.page, bundle / REPORT_FILE)
    shutil.copyfile(files.card, bundle / MODEL_CARD_FILE)
    return files.page
