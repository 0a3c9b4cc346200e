"""Job command lines generated from the config models, so a field is declared once.

Every field of a job's config becomes a flag (``epochs`` → ``--epochs``, ``optim.lr`` →
``--optim.lr``) with its type, ``Literal`` choices, description and default taken from the
pydantic model by pydantic-settings' ``CliSettingsSource`` (a maintained library from the
pydantic team that adds the flags to a plain ``argparse`` parser, so the job keeps its own
few flags such as ``--config`` and ``--address``). Short names (``--lr`` for ``--optim.lr``)
are aliases declared per job; a new config field needs no edit in ``jobs/``.

Precedence stays defaults < YAML (``--config``) < flags: the generated parser only collects the
flags a user gave, and ``resolve_config`` validates the merged result with field-naming errors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import CliSettingsSource, SettingsError

from imgpipe.config.loading import ConfigError, resolve_config

M = TypeVar("M", bound=BaseModel)

# argparse attributes of the job's own flags (not config fields) start with this
_JOB = "job_"


def config_parser(model: type[BaseModel], description: str | None, *,
                  shortcuts: Mapping[str, str | Sequence[str]] | None = None,
                  renamed: Mapping[str, str] | None = None,
                  config_help: str | None = None) -> argparse.ArgumentParser:
    """An ``argparse`` parser with one flag per field of ``model`` (nested: ``--section.field``).

    Args:
        model: the job's config model.
        description: the job's ``--help`` text (its module docstring).
        shortcuts: generated flag (without ``--``) → alias(es), e.g. ``{"optim.lr": "lr"}``.
        renamed: alias → generated flag for names pydantic-settings cannot alias (a shorthand
            equal to a section's name, such as ``--loss`` for ``--loss.name``, or an old
            ``--no-*`` flag); rewritten before parsing and listed in ``--help``.
        config_help: ``--config``'s help when the file is not simply the model's fields.

    Add the job's own flags with ``add_job_flag`` so they stay apart from the config's.
    """
    renamed = dict(renamed or {})
    epilog = None
    if renamed:
        epilog = "shorthands: " + ", ".join(f"--{a} = --{t}" for a, t in renamed.items())
    # no abbreviations: `--epoch 3` must not quietly mean --epochs
    parser = argparse.ArgumentParser(description=description, epilog=epilog, allow_abbrev=False,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", dest=f"{_JOB}config", metavar="YAML",
                        help=config_help or f"YAML file ({model.__name__} fields); flags override it")
    source = CliSettingsSource(
        model, root_parser=parser, cli_kebab_case=True, cli_implicit_flags=True,
        cli_avoid_json=True, cli_hide_none_type=True, cli_exit_on_error=True,
        cli_shortcuts=dict(shortcuts or {}))
    _optional_bool_flags(parser, model)
    parser.set_defaults(**{f"{_JOB}source": source, f"{_JOB}renamed": renamed})
    return parser


def _optional_bool_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """``--name`` / ``--no-name`` for each top-level ``bool | None`` field (None: decided by the
    job, e.g. ``refit``), which pydantic-settings would turn into ``--name {bool,null}``."""
    for name, info in model.model_fields.items():
        if info.annotation != (bool | None):
            continue
        flag = "--" + name.replace("_", "-")
        action = parser._option_string_actions.get(flag)
        if action is None:
            continue
        parser._remove_action(action)
        for group in parser._action_groups:  # else --help still lists the removed flag
            if action in group._group_actions:
                group._group_actions.remove(action)
        for option in action.option_strings:
            parser._option_string_actions.pop(option, None)
        group = parser.add_mutually_exclusive_group()
        # the strings pydantic-settings itself parses into a bool
        group.add_argument(flag, dest=action.dest, action="store_const", const="true",
                           default=argparse.SUPPRESS,
                           help=(action.help or "").replace(" (default: None)", ""))
        group.add_argument(f"--no-{flag[2:]}", dest=action.dest, action="store_const",
                           const="false", default=argparse.SUPPRESS,
                           help=f"the opposite of {flag}")


def add_job_flag(parser: argparse.ArgumentParser, *flags: str, **kwargs: Any) -> None:
    """A flag of the job itself (``--address``, ``--verbose``), not of its config: read it from
    the second value ``parse_job_args`` returns, under its ``dest`` (default: the flag's name)."""
    dest = kwargs.pop("dest", flags[0].lstrip("-").replace("-", "_"))
    if kwargs.get("action") is None and "metavar" not in kwargs:
        kwargs["metavar"] = dest.upper()
    parser.add_argument(*flags, dest=f"{_JOB}{dest}", **kwargs)


def add_section_flags(parser: argparse.ArgumentParser, model: type[BaseModel], section: str,
                      flags: Mapping[str, str]) -> None:
    """Flags for fields of a free-form section of the job's config (tune's ``train:`` holds
    ``TrainConfig`` fields every trial shares): ``{"weights": "model.weights"}`` adds
    ``--weights`` setting ``train.model.weights``, typed, described and with choices from
    ``model``'s field, so the flag cannot drift from the field it sets."""
    for flag, path in flags.items():
        info = _field(model, path)
        adapter = TypeAdapter(info.annotation)

        def parse(text: str, adapter: TypeAdapter = adapter, path: str = path) -> Any:
            try:
                return adapter.validate_strings(text)
            except ValidationError as e:
                raise argparse.ArgumentTypeError(f"{path}: {e.errors()[0]['msg']}") from None

        literal = [a for a in get_args(info.annotation) if get_origin(a) is Literal]
        parser.add_argument(f"--{flag}", dest=f"{_JOB}{section}.{path}", type=parse,
                            help=f"{info.description or ''} (sets {section}.{path})".strip(),
                            metavar="{" + ",".join(get_args(literal[0])) + "}" if literal
                            else flag.upper().replace("-", "_"))


def _field(model: type[BaseModel], dotted: str) -> FieldInfo:
    *sections, leaf = dotted.split(".")
    for name in sections:
        model = next(a for a in (model.model_fields[name].annotation, *get_args(
            model.model_fields[name].annotation)) if isinstance(a, type) and issubclass(a, BaseModel))
    return model.model_fields[leaf]


def parse_job_args(model: type[M], parser: argparse.ArgumentParser,
                   argv: Sequence[str] | None) -> tuple[M, dict[str, Any]]:
    """Parse ``argv`` with a ``config_parser`` parser → (validated config, the job's own flags).

    Raises:
        SystemExit: an unknown flag or a value argparse rejects (exit code 2, as argparse).
        ConfigError: a value the config rejects; the message names the field.
    """
    config_file, overrides, job = parse_job_flags(parser, argv)
    return resolve_config(model, config_file, overrides), job


def parse_job_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None
                    ) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """The unvalidated parts: (``--config`` file, dotted overrides the user typed, job flags),
    for a job that acts on a flag before its config can be complete (monitor's
    ``--init-reference``). ``parse_job_args`` validates them in one step."""
    renamed = parser.get_default(f"{_JOB}renamed") or {}
    args = [_rename(a, renamed) for a in (sys.argv[1:] if argv is None else argv)]
    namespace = parser.parse_args(args)
    source: CliSettingsSource = getattr(namespace, f"{_JOB}source")
    given = {k: v for k, v in vars(namespace).items() if not k.startswith(_JOB)}
    try:
        overrides = _flatten(source(parsed_args=argparse.Namespace(**given))())
    except SettingsError as e:  # e.g. a dict flag that is neither JSON nor key=value
        raise ConfigError(str(e)) from None
    job = {k[len(_JOB):]: v for k, v in vars(namespace).items()
           if k.startswith(_JOB) and k not in (f"{_JOB}source", f"{_JOB}renamed")}
    for key in [k for k in job if "." in k]:  # add_section_flags
        if (value := job.pop(key)) is not None:
            overrides[key] = value
    return job.pop("config"), overrides, job


def _rename(arg: str, renamed: Mapping[str, str]) -> str:
    flag, eq, value = arg.partition("=")
    if flag.startswith("--") and flag[2:] in renamed:
        return f"--{renamed[flag[2:]]}{eq}{value}"
    return arg


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": "0.1"}}`` → ``{"optim.lr": "0.1"}`` (what ``resolve_config`` merges)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
