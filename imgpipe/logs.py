"""A readable console: Ray's internal INFO lines stay in Ray's log files, not on the screen.

Jobs print one line per epoch/trial; Ray Data's per-dataset lines ("Dataset … execution
finished", "Registered dataset logger", operator plans) and its progress bars flood it from
inside every train worker. Ray Data reads its logging set-up from ``RAY_DATA_LOGGING_CONFIG``
(a YAML dictConfig, ray/data/_internal/logging.py) in every process it runs in, so the driver
sets it before Ray starts and the workers inherit it: the file handler (``ray-data.log`` in the
session's log folder) keeps everything, the console handler only warnings. ``verbose`` puts
Ray's default behaviour back.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import yaml


class DropRayNotices(logging.Filter):
    """Drops Ray Data's console lines that ask nothing of the user: the start-up notices every
    process repeats ("Progress bars disabled …": this module disables them on purpose), and the
    prefetch thread's traceback when a stream's consumer is torn down mid-epoch.

    The second comes from a trial that ASHA stops early: Train kills the trial's worker while
    the Ray Data prefetch thread waits on the object store, and the thread logs the closed
    socket ("Failed to read data from the socket: End of file") with a 16-line traceback. The
    prefetch is only a hint (``ray.wait(..., timeout=0)``); a real fetch failure surfaces on the
    iterating thread, which raises it. The file handler keeps the record.
    """

    NOTICES = ("Progress bars disabled", "Progress bars for operators disabled",
               "Progress will be logged", "Error in prefetcher thread")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTICES)


# Warnings that workers raise on every run from inside Ray Data / DDP, about their own
# internals (a read-only NumPy view handed to torch; DDP's bucket layout for 1-channel convs).
WORKER_WARNINGS = ("ignore::DeprecationWarning", "ignore::FutureWarning",
                   "ignore::UserWarning:ray.data.util.torch_utils",
                   "ignore::UserWarning:torch.autograd.graph")

_DATA_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"ray": {"format": "%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- "
                                     "%(message)s"}},
    "filters": {"console_filter": {"()": "ray.data._internal.logging.HiddenRecordFilter"},
                "notices": {"()": "imgpipe.logs.DropRayNotices"}},
    "handlers": {
        "file": {"class": "ray.data._internal.logging.SessionFileHandler", "formatter": "ray",
                 "filename": "ray-data.log"},
        "console": {"class": "ray._private.log.PlainRayHandler", "formatter": "ray",
                    "level": "WARNING", "filters": ["console_filter", "notices"]},
    },
    "loggers": {"ray.data": {"level": "DEBUG", "handlers": ["file", "console"],
                             "propagate": False}},
}


# Ray-internal notes that report Ray's own bookkeeping, not the user's run: logger → the start
# of the one message dropped (the logger's other warnings, e.g. a failed clean-up, still show).
# Train's placement-group cleaner notes at the end of every trial that it is removing the
# finished controller's placement group (its liveness poll races the controller's own clean-up).
# A one-worker Tune trial, which trains in its own actor, logs the path of every epoch's
# checkpoint (Tune's storage module, at INFO); the trial lines and the ranking say what counts.
QUIET_WORKER_NOTES = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner":
        "Detected that the Ray Train controller actor",
    "ray.train._internal.storage": "Checkpoint successfully created at",
}
QUIET_ENV = "IMGPIPE_QUIET_RAY_LOGGERS"


class DropMessage(logging.Filter):
    """Drops records whose message starts with ``text`` (``anywhere``: contains it)."""

    def __init__(self, text: str, anywhere: bool = False) -> None:
        super().__init__()
        self.text, self.anywhere = text, anywhere

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return self.text not in msg if self.anywhere else not msg.startswith(self.text)


def quiet_worker_loggers() -> None:
    """Ray's ``worker_process_setup_hook`` for the instances imgpipe starts: in a worker of an
    instance started after ``configure_console(verbose=False)``, drop the notes in
    :data:`QUIET_WORKER_NOTES`. Ray tees a worker's stderr to its log file and to the driver,
    so those notes leave both; ``--verbose`` keeps them."""
    if os.environ.get(QUIET_ENV) == "1":
        for name, prefix in QUIET_WORKER_NOTES.items():
            logging.getLogger(name).addFilter(DropMessage(prefix))


# Lines the raylet sends to every driver's console about its own bookkeeping (they stay in the
# session's raylet.out): the count of worker processes it has started, each time the count
# passes another multiple of its start-up concurrency (the CPU count), which a Tune search on a
# laptop does every few trials, and whose advice is for clusters starving on blocked tasks.
RAYLET_NOTES = ("worker processes have been started on node",)


class DropRayletNotes:
    """Wraps Ray's driver-side printer of forwarded lines (``print_to_stdstream``), dropping the
    raylet's lines that contain one of :data:`RAYLET_NOTES`; every other line passes."""

    def __init__(self, printer) -> None:
        self.printer = printer

    def __call__(self, data: dict, *args, **kwargs) -> None:
        if data.get("pid") == "raylet":
            lines = [ln for ln in data.get("lines", []) if not any(n in ln for n in RAYLET_NOTES)]
            if not lines:
                return
            data = {**data, "lines": lines}
        self.printer(data, *args, **kwargs)


def quiet_raylet_notes() -> None:
    """On this driver, Ray's printer of the raylet's messages drops :data:`RAYLET_NOTES`.

    Ray 2.60's driver prints them from a thread (``listen_error_messages``) that looks up
    ``ray._private.worker.print_to_stdstream`` at each call, so wrapping that module attribute
    is enough, before or after ``ray.init``; idempotent; does nothing where it is missing.
    """
    from ray._private import worker as ray_worker

    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is not None and not isinstance(printer, DropRayletNotes):
        ray_worker.print_to_stdstream = DropRayletNotes(printer)


# Tune's timing hints on the driver ("The `process_trial_result` operation took 1.689 s, which
# may be a performance bottleneck"): on a laptop a busy core, not the search, is the reason,
# and the advice (report less often) does not apply to one report per epoch.
TUNE_SLOW_NOTE = "which may be a performance bottleneck"
TUNE_SLOW_LOGGERS = ("ray.tune.utils.util", "ray.tune.execution.tune_controller")
# After Ctrl-C, Tune's advice is Python ("Resume experiment with: Tuner.restore(...)", or
# "Resume training with" for a one-worker train run), which a user of the jobs cannot act on;
# the jobs print the command line that continues the run (--resume) instead.
TUNE_INTERRUPTED_NOTE = "has been interrupted, but the most recent state was saved"
TUNE_INTERRUPTED_LOGGER = "ray.tune.tune"


def configure_console(verbose: bool = False) -> None:
    """Call before ``ray.init``: quiet Ray Data's console (unless ``verbose``); files keep all.
    Forwarded worker lines lose Ray's colour codes when stdout is not a terminal.

    Also, in this process: the raylet's worker-count notes (:data:`RAYLET_NOTES`), Tune's
    timing hints (:data:`TUNE_SLOW_NOTE`), Tune's Python resume advice after Ctrl-C
    (:data:`TUNE_INTERRUPTED_NOTE`), Tune's experiment banner ("Configuration for
    experiment", "View detailed results here", the TensorBoard hint) and Optuna's "A new study
    created" are left out, since the jobs print their own per-trial lines and summary.
    """
    if not sys.stdout.isatty():
        # Ray colours the "(actor pid=...)" prefix of forwarded worker lines; in a file or a
        # pipe (CI logs, `| tee`) the escape codes are noise (read at print time by Ray).
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if verbose:
        return
    os.environ.setdefault(QUIET_ENV, "1")  # read by quiet_worker_loggers in every worker
    # Tune's new console prints its banner even at verbose=0; the classic one prints nothing at
    # verbose=0 (every RunConfig imgpipe builds sets it: the classic default, 3, prints tables).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune warns when it snapshots its experiment state more often than every 5 s: it must,
    # whenever a trial has checkpointed ``num_to_keep`` times since the last snapshot, and a
    # small model's epochs on local storage take less than that; the advice (keep more
    # checkpoints, checkpoint less often) trades disk for nothing here. 0 is Ray's off switch.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    optuna = sys.modules.get("optuna")  # imported by the tune job; never imported here
    if optuna is not None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = Path(tempfile.gettempdir()) / f"imgpipe-ray-data-logging-{os.getuid()}.yaml"
    text = yaml.safe_dump(_DATA_CONFIG)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(path))
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # Library deprecation notices are for developers; they stay visible with --verbose.
    os.environ.setdefault("PYTHONWARNINGS", ",".join(WORKER_WARNINGS))
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    _quiet_driver_data_console()
    quiet_raylet_notes()
    for name, note in [*((n, TUNE_SLOW_NOTE) for n in TUNE_SLOW_LOGGERS),
                       (TUNE_INTERRUPTED_LOGGER, TUNE_INTERRUPTED_NOTE)]:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessage) and f.text == note for f in logger.filters):
            logger.addFilter(DropMessage(note, anywhere=True))


def _quiet_driver_data_console() -> None:
    """This process imported Ray Data (and set up its console handler at INFO) before the
    variable above existed: give that handler the workers' level and filter."""
    data_logger = logging.getLogger("ray.data")
    for handler in data_logger.handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
            handler.addFilter(DropRayNotices())
