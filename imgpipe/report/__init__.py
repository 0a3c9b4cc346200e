"""Evaluation report of a bundle: PNG figures (``figures``), one self-contained ``report.html``
(``page``) and the model card (``card``); ``write_report`` (``write``) evaluates a bundle and
writes all three."""

from imgpipe.report.labels import MODEL_CARD_FILE, REPORT_FILE, SUMMARY_METRICS
from imgpipe.report.write import write_report

__all__ = ["MODEL_CARD_FILE", "REPORT_FILE", "SUMMARY_METRICS", "write_report"]
