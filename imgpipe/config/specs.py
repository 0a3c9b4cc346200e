"""The small languages of string options, parsed: class-weight schemes, sampler strategies,
fine-tuning modes, deployment priors and monitoring windows. One parser each, shared by config
validation (which must fail before any work with the field's name) and by the code that
applies the option.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

import numpy as np

from imgpipe.config.loading import ConfigError
from imgpipe.constants import PRIOR_CHOICES

FINETUNE_MODES = ("full", "linear-probe", "partial:K", "bitfit", "lora")
_PARTIAL = re.compile(r"^partial:(\d+|0?\.\d+)$")

SAMPLER_STRATEGIES = ("none", "oversample", "undersample", "sqrt", "explicit")


@dataclass(frozen=True)
class WeightSpec:
    scheme: str
    beta: float | None = None
    vector: tuple[float, ...] | None = None


@dataclass(frozen=True)
class SamplerSpec:
    strategy: str
    target: tuple[float, ...] | None = None


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if any(not np.isfinite(v) or v < 0 for v in values) or not any(v > 0 for v in values):
        raise ValueError(f"{what}: values must be finite, >= 0 and not all zero, got {text!r}")
    return values


def parse_class_weights(text: str) -> WeightSpec:
    """``none`` | ``power:BETA`` (w ∝ n^-β, β∈[0,1]) | ``effective:BETA`` (β∈[0,1)) | ``w1,w2,...``."""
    text = text.strip()
    if text == "none":
        return WeightSpec("none")
    name, _, arg = text.partition(":")
    if name in ("power", "effective"):
        try:
            beta = float(arg)
        except ValueError:
            raise ValueError(f"class_weights: {name} needs a number, e.g. {name}:0.5") from None
        hi_ok = beta <= 1 if name == "power" else beta < 1
        if not (beta >= 0 and hi_ok):
            rng = "[0, 1]" if name == "power" else "[0, 1)"
            raise ValueError(f"class_weights: {name} beta must be in {rng}, got {beta}")
        return WeightSpec(name, beta=beta)
    return WeightSpec("explicit", vector=_floats(text, "class_weights"))


def parse_sampler(text: str) -> SamplerSpec:
    """``none`` | ``oversample`` | ``undersample`` | ``sqrt`` | ``p1,p2,...`` (target distribution)."""
    text = text.strip()
    if text in SAMPLER_STRATEGIES[:4]:
        return SamplerSpec(text)
    if text and (text[0].isdigit() or text[0] in ".-+"):  # a vector (a sign: its own error)
        return SamplerSpec("explicit", target=_floats(text, "sampler"))
    raise ValueError(
        f"sampler: unknown strategy {text!r}; choose one of none, oversample, undersample, "
        "sqrt, or a comma-separated target distribution"
    )


@dataclass(frozen=True)
class Finetune:
    """A parsed ``--finetune`` value: ``mode`` and, for ``partial``, the first trained stage
    (``stage``) or the frozen fraction of the stages (``fraction``)."""

    mode: str
    stage: int = 0
    fraction: float | None = None

    def __str__(self) -> str:
        if self.mode != "partial":
            return self.mode
        return f"partial:{self.fraction:g}" if self.fraction is not None else f"partial:{self.stage}"

    def frozen_stages(self, num_stages: int) -> int:
        """K for a model with ``num_stages`` stages (``partial`` only)."""
        if self.fraction is not None:
            return int(round(self.fraction * num_stages))
        return self.stage


def parse_finetune(text: str) -> Finetune:
    """``full | linear-probe | partial:K | bitfit | lora`` → ``Finetune``.

    Raises:
        ValueError: anything else (the message lists the valid forms).
    """
    value = str(text).strip().lower().replace("_", "-")
    if value in ("full", "linear-probe", "bitfit", "lora"):
        return Finetune(value)
    m = _PARTIAL.match(value)
    if m:
        k = m.group(1)
        return Finetune("partial", fraction=float(k)) if "." in k else Finetune("partial", int(k))
    raise ValueError(f"finetune: {text!r} is not one of {' | '.join(FINETUNE_MODES)}")


def parse_prior(value: str | list[float] | None) -> str | list[float] | None:
    """``model`` | ``balanced`` | ``train`` | ``"p1,p2,..."`` (or a list) → a deployment prior.

    None stays None (= the bundle's own choice).

    Raises:
        ConfigError: neither a prior name nor a comma-separated vector (the message names it).
    """
    if value is None or isinstance(value, list):
        return value
    text = value.strip()
    if text in PRIOR_CHOICES:
        return text
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"prior {value!r}: expected one of {', '.join(PRIOR_CHOICES)} or a "
                          "comma-separated vector of class probabilities") from None


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


@dataclass(frozen=True)
class Window:
    """A monitoring window: ``duration`` or ``rows`` (exactly one is set)."""

    duration: timedelta | None = None
    rows: int | None = None

    def describe(self) -> str:
        return f"last {self.rows} rows" if self.rows else f"last {self.duration}"


def parse_window(text: str | int) -> Window:
    """``"1h"`` / ``"30m"`` / ``"2d"`` / ``"45s"`` → a duration; ``"500"`` → the newest 500 rows.

    Raises:
        ConfigError: anything else (the message shows the accepted forms).
    """
    s = str(text).strip().lower()
    if s.isdigit() and int(s) > 0:
        return Window(rows=int(s))
    m = _DURATION.match(s)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"window {text!r}: expected a duration like 30m, 1h, 2d or a row count "
                          "like 500")
    return Window(duration=timedelta(**{_UNITS[m.group(2)]: float(m.group(1))}))
