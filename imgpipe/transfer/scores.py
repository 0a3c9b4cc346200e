"""The transferability scores, each in a plain and a class-balanced variant, by name.

| name            | source                          | needs             |
|-----------------|---------------------------------|-------------------|
| ``logme``       | You et al., ICML 2021           | train features    |
| ``leep``        | Nguyen et al., ICML 2020        | source head       |
| ``nce``         | Tran et al., ICCV 2019          | source head       |
| ``hscore``      | Bao et al. 2019, shrinkage: Ibrahim et al. 2022 | train features |
| ``knn``         | cosine k-NN, balanced accuracy on val  | train + val features |
| ``linear_probe``| logistic regression, balanced accuracy on val | train + val features |

``<name>_balanced`` weights the target classes equally (see each module). Every score is
"higher is better". A score that does not apply (LEEP without a source head) is None.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from imgpipe.constants import BALANCED_SUFFIX, TRANSFER_SCORE_NAMES, TRANSFER_SCORES
from imgpipe.transfer.features import Features
from imgpipe.transfer.hscore import hscore
from imgpipe.transfer.leep import leep
from imgpipe.transfer.logme import logme
from imgpipe.transfer.nce import nce
from imgpipe.transfer.probe import knn_accuracy, linear_probe_accuracy

ScoreFn = Callable[[Features, Features, bool], float | None]


def _logme(tr: Features, _va: Features, b: bool) -> float:
    return logme(tr.features, tr.labels, balanced=b)


def _leep(tr: Features, _va: Features, b: bool) -> float | None:
    return None if tr.source_logits is None else leep(tr.source_logits, tr.labels, balanced=b)


def _nce(tr: Features, _va: Features, b: bool) -> float | None:
    return None if tr.source_logits is None else nce(tr.source_logits, tr.labels, balanced=b)


def _hscore(tr: Features, _va: Features, b: bool) -> float:
    return hscore(tr.features, tr.labels, balanced=b)


def _knn(tr: Features, va: Features, b: bool) -> float:
    return knn_accuracy(tr.features, tr.labels, va.features, va.labels, balanced=b)


def _probe(tr: Features, va: Features, b: bool) -> float:
    return linear_probe_accuracy(tr.features, tr.labels, va.features, va.labels, balanced=b)


SCORES: dict[str, ScoreFn] = {
    "logme": _logme, "leep": _leep, "nce": _nce, "hscore": _hscore, "knn": _knn,
    "linear_probe": _probe,
}
assert tuple(SCORES) == TRANSFER_SCORES  # the names configs validate against


def score_names() -> list[str]:
    """Every score name: each base name, then its ``_balanced`` variant."""
    return list(TRANSFER_SCORE_NAMES)


def compute_scores(train: Features, val: Features,
                   names: list[str] | None = None) -> tuple[dict[str, float | None],
                                                            dict[str, float]]:
    """All (or the named) scores of one candidate → (scores, seconds per score).

    Raises:
        ValueError: an unknown score name (lists the valid ones).
    """
    wanted = names or score_names()
    unknown = sorted(set(wanted) - set(score_names()))
    if unknown:
        raise ValueError(f"unknown score(s) {unknown}; valid: {', '.join(score_names())}")
    scores: dict[str, float | None] = {}
    seconds: dict[str, float] = {}
    for name in wanted:
        balanced = name.endswith(BALANCED_SUFFIX)
        base = name[: -len(BALANCED_SUFFIX)] if balanced else name
        started = time.perf_counter()
        scores[name] = SCORES[base](train, val, balanced)
        seconds[name] = round(time.perf_counter() - started, 4)
    return scores, seconds
