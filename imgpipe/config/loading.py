"""Reading configs: YAML files, dotted command-line overrides, validation errors that name the
field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from imgpipe.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the offending field(s)."""


M = TypeVar("M", bound=BaseModel)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file. Raises ConfigError for a missing, unreadable or invalid file."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = target
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    node[leaf] = value


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Set each dotted key of ``overrides`` (``optim.lr``) in ``data``, in place; ``None``
    values are skipped (a flag the user did not give). Returns ``data``.

    Raises:
        ConfigError: a dotted key runs through a value that is not a section.
    """
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    return data


def resolve_config(model: type[M], yaml_path: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> M:
    """Defaults < YAML < overrides (dotted keys, ``None`` values ignored) → validated model.

    Raises:
        ConfigError: naming every invalid field, e.g. ``optim.lr: Input should be greater than 0``.
    """
    data = apply_overrides(load_yaml(yaml_path) if yaml_path else {}, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, model.__name__)) from None


def format_validation_error(e: ValidationError, what: str) -> str:
    """``invalid <what>:`` and one indented line per error (``field.path: message``)."""
    return "\n".join([f"invalid {what}:", *validation_error_lines(e)])


def validation_error_lines(e: ValidationError, section: str = "") -> list[str]:
    """One ``  field.path: message`` line per error, the path under ``section`` if given.

    A model validator's error has no path; its message names the field itself (imgpipe's
    validators start with it), so it is shown without pydantic's "Value error, " prefix, one
    line per line of the message.
    """
    lines = []
    for err in e.errors():
        loc = ".".join([section] * bool(section) + [str(p) for p in err["loc"]])
        msg = err["msg"].removeprefix("Value error, ")
        if err["loc"]:
            # a parser shared with non-pydantic callers names its field itself: say it once
            msg = msg.removeprefix(f"{err['loc'][-1]}: ")
            lines.append(f"  {loc}: {msg}")
        else:
            lines += [f"  {x.strip()}" for x in msg.splitlines() if x.strip()]
    return lines
