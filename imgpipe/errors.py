"""The domain-error hierarchy: what a job reports as a message, and what stays a bug.

- ``UserError``: a mistake the user can fix (a bad flag, a missing or unprepared data folder,
  an impossible resource plan, a dead Ray address, an output the cluster would lose). Jobs print
  ``error: <message>`` and exit 2, without a traceback: the message says what to change.
- ``ImgpipeFailure``: the run itself failed in a way imgpipe detected and explains (an exported
  bundle that does not reproduce its trial, a search where no trial produced a result). Jobs
  print the message and exit 1.
- Anything else (``ValueError`` from a library, ``KeyError``, ``AssertionError``, ...) is a bug
  and keeps its traceback: jobs never catch the built-in exception types wholesale.

Some domain errors also derive from a built-in type (``ValueError``, ``FileNotFoundError``) for
callers and pydantic validators that expect it; jobs catch them by the domain base only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

USER_ERROR_EXIT = 2
FAILURE_EXIT = 1


class ImgpipeError(Exception):
    """Base of every error imgpipe raises on purpose."""


class UserError(ImgpipeError):
    """A mistake the user can fix; the message says what to change (jobs exit 2)."""


class ImgpipeFailure(ImgpipeError):
    """A run that failed for a reason imgpipe detected and explains (jobs exit 1)."""


class DataSourceError(UserError, ValueError):
    """An image folder, manifest file or prepared-shard folder that cannot be used as given."""


class CheckpointError(UserError, FileNotFoundError):
    """A folder passed as a checkpoint (``--resume``, export) that is not one."""


class OutputLocationError(UserError):
    """An output location that cannot be written, or that a cluster job would lose."""


def run_job(main: Callable[[], int], prog: str) -> int:
    """Call a job's ``main`` and map domain errors to exit codes; bugs keep their traceback."""
    try:
        return main()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return USER_ERROR_EXIT
    except ImgpipeFailure as e:
        print(f"{prog}: failed: {e}", file=sys.stderr)
        return FAILURE_EXIT
