"""Evaluation report of a bundle: PNG figures (``figures``), one self-contained ``report.html``
(``page``) and the model card (``card``). ``write_report`` (``write``) evaluates a bundle and
writes all three into an output folder; ``document_bundle`` (``bundle_docs``) also calibrates
the bundle and records the report, card and metrics in it."""

from imgpipe.report.bundle_docs import document_bundle
from imgpipe.report.labels import MODEL_CARD_FILE, REPORT_FILE, SUMMARY_METRICS
from imgpipe.report.write import ReportFiles, render_report, write_report

__all__ = ["MODEL_CARD_FILE", "REPORT_FILE", "SUMMARY_METRICS", "ReportFiles", "document_bundle",
           "render_report", "write_report"]
