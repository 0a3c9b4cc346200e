"""Choosing the starting weights of a search: rank ``--candidates`` by transferability on the
target data, then search over the top ``top_k`` (``search.weights``) like any parameter.

Ranking is cheap next to fine-tuning (features once, closed-form scores), so the search spends
its trials on the backbones most likely to transfer instead of one trial budget per candidate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from imgpipe.config import RankConfig, TuneJobConfig
from imgpipe.console import format_table
from imgpipe.data.manifest import Manifest
from imgpipe.errors import UserError
from imgpipe.training.defaults import resolve_input_size
from imgpipe.transfer.ranking import OK, rank_candidates
from imgpipe.tuning.tuner import absolute, base_train_config


class NoUsableCandidateError(UserError):
    """Every candidate failed to load or score; the message lists each one's reason."""


def rank_config(tcfg: TuneJobConfig, manifest: Manifest, out: Path) -> RankConfig:
    """The ranking the tune job runs: the job's data, seed and score; candidates without their
    own preprocessing are decoded at the size training would use for this data."""
    size = resolve_input_size(base_train_config(tcfg), manifest)[0].model.image_size or 32
    return RankConfig(data=absolute(tcfg.data), candidates=list(tcfg.candidates or []),
                      out=str(out), primary=tcfg.rank_score, image_size=size, seed=tcfg.seed,
                      cpus_per_actor=min(1.0, tcfg.cpus_per_worker * tcfg.max_concurrent))


def top_candidates(doc: dict[str, Any], k: int) -> list[str]:
    """The ``k`` best candidates of a ranking document that loaded and have the primary score.

    Raises:
        NoUsableCandidateError: none did, with every candidate's reason.
    """
    primary = doc["primary"]
    ok = [r for r in doc["candidates"]
          if r["status"] == OK and r["scores"].get(primary) is not None]
    if not ok:
        reasons = "; ".join(f"{r['candidate']}: {r.get('reason') or f'no {primary} score'}"
                            for r in doc["candidates"])
        raise NoUsableCandidateError(f"candidates: none can be searched ({reasons})")
    return [r["candidate"] for r in ok[:k]]  # rows are ordered best first


def _score_cell(row: dict[str, Any], score: str) -> str:
    if row["status"] != OK:
        return "FAILED: " + row["reason"][:80]
    value = row["scores"].get(score)
    return "n/a" if value is None else f"{value:.4f}"  # a score of 0.0 is a value, not missing


def choose_candidates(tcfg: TuneJobConfig, manifest: Manifest, out: Path) -> TuneJobConfig:
    """Rank ``tcfg.candidates`` into ``out`` (``ranking.json`` and plots) and return the config
    whose search draws its starting weights from the top ``tcfg.top_k``. Ray must be up.

    Raises:
        NoUsableCandidateError: no candidate could be loaded and scored.
    """
    print(f"ranking {len(tcfg.candidates or [])} candidate(s) by {tcfg.rank_score} ...",
          flush=True)
    doc = rank_candidates(rank_config(tcfg, manifest, out), progress=lambda _line: None)
    rows = [[r["candidate"], r.get("rank") or "-", _score_cell(r, tcfg.rank_score)]
            for r in doc["candidates"]]
    print(format_table(["candidate", "rank", tcfg.rank_score], rows))
    top = top_candidates(doc, tcfg.top_k)
    print(f"searching over the top {len(top)}: {', '.join(top)} "
          f"(ranking in {out / 'ranking.json'}, {doc['wall_time_s']:.0f} s)", flush=True)
    return tcfg.model_copy(update={"search": {**tcfg.search, "weights": top}})
