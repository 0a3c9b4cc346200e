"""The jobs' console: Ray Data's INFO lines and start-up notices stay in Ray's log files, its
warnings still show, in the driver and in every worker (``imgpipe.logs``). No Ray instance:
each case runs in a fresh interpreter, as a job's driver or a Ray worker starts (one case
starts its own small instance: the colour codes of forwarded worker lines)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

EMIT = """
import logging
executor = logging.getLogger("ray.data._internal.execution.streaming_executor")
executor.info("Dataset dataset_1 execution finished in 1.00 seconds")
logging.getLogger("ray.data._internal.progress").warning(
    "Progress bars disabled. To enable, set ...")
executor.warning("object store memory is nearly full")
try:
    raise OSError("Failed to read data from the socket: End of file")
except OSError:
    logging.getLogger("ray.data._internal.block_batching.util").exception(
        "Error in prefetcher thread.")
"""


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120, check=True)


def test_driver_and_worker_consoles_keep_warnings_only():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_DATA_LOGGING_CONFIG", "PYTHONWARNINGS")}
    # The driver: Ray Data was imported (console at INFO) before configure_console ran.
    driver = _run("import ray.data\nfrom imgpipe.logs import configure_console\n"
                  "configure_console(verbose=False)\n" + EMIT
                  + "import os; print(os.environ['RAY_DATA_LOGGING_CONFIG'])", env)
    config = driver.stdout.strip().splitlines()[-1]
    # A worker of the instance: inherits the variable, Ray Data configures itself from it.
    worker = _run("import ray.data\n" + EMIT, {**env, "RAY_DATA_LOGGING_CONFIG": config})
    for proc in (driver, worker):
        assert "object store memory is nearly full" in proc.stderr
        assert "execution finished" not in proc.stderr
        assert "Progress bars disabled" not in proc.stderr
        # a trial stopped by ASHA: the prefetch thread's traceback at teardown
        assert "prefetcher" not in proc.stderr and "End of file" not in proc.stderr
    # --verbose: Ray's defaults, INFO lines included.
    verbose = _run("import ray.data\nfrom imgpipe.logs import configure_console\n"
                   "configure_console(verbose=True)\n" + EMIT, env)
    assert "execution finished" in verbose.stderr
    assert "Error in prefetcher thread" in verbose.stderr


def test_tune_banner_and_optuna_notes_stay_off_the_driver_console():
    """The tune job imports Optuna before configure_console: its study notes drop to WARNING and
    Tune's classic console (silent at verbose=0) replaces the banner-printing one."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_DATA_LOGGING_CONFIG", "PYTHONWARNINGS", "RAY_AIR_NEW_OUTPUT")}
    code = ("import os, optuna\nfrom imgpipe.logs import configure_console\n"
            "configure_console(verbose={verbose})\noptuna.create_study()\n"
            "print(os.environ.get('RAY_AIR_NEW_OUTPUT'))")
    code += "\nfrom ray.tune.experimental.output import get_air_verbosity\nprint(get_air_verbosity(0))"
    quiet = _run(code.format(verbose=False), env)
    assert "A new study created" not in quiet.stderr
    assert quiet.stdout.split() == ["0", "None"]  # Tune reads it: no new-console reporter
    loud = _run(code.format(verbose=True), env)
    assert "A new study created" in loud.stderr
    assert loud.stdout.split()[0] == "None" and loud.stdout.split()[1] != "None"


def test_quiet_worker_loggers_drops_only_the_routine_note(monkeypatch):
    import logging

    from imgpipe.logs import QUIET_ENV, QUIET_WORKER_NOTES, quiet_worker_loggers

    loggers = {name: logging.getLogger(name) for name in QUIET_WORKER_NOTES}
    for logger in loggers.values():
        monkeypatch.setattr(logger, "filters", [])
    monkeypatch.delenv(QUIET_ENV, raising=False)  # --verbose: nothing changes
    quiet_worker_loggers()
    for name, prefix in QUIET_WORKER_NOTES.items():
        assert loggers[name].filter(logging.makeLogRecord({"msg": prefix + " (a) is dead."}))
    monkeypatch.setenv(QUIET_ENV, "1")
    quiet_worker_loggers()
    for name, prefix in QUIET_WORKER_NOTES.items():
        assert not loggers[name].filter(logging.makeLogRecord({"msg": prefix + " (a) x."}))
        assert loggers[name].filter(logging.makeLogRecord({"msg": "Failed to clean up: x"}))


def test_driver_drops_only_the_raylets_worker_count_note(monkeypatch, capsys):
    from ray._private import worker as ray_worker

    from imgpipe.logs import quiet_raylet_notes

    note = ("WARNING: 8 PYTHON worker processes have been started on node: 64 with address: "
            "192.0.2.2, which is 4x the maximum expected startup concurrency (2).")
    # Ray's own printer; restored after the test
    monkeypatch.setattr(ray_worker, "print_to_stdstream", ray_worker.print_to_stdstream)
    quiet_raylet_notes()
    quiet_raylet_notes()  # idempotent: one wrapper, not two
    assert ray_worker.print_to_stdstream.printer.__module__ == "ray._private.worker"
    ray_worker.print_to_stdstream({"pid": "raylet", "lines": [note], "is_err": False},
                                  ignore_prefix=False)
    assert capsys.readouterr().out == ""
    ray_worker.print_to_stdstream(
        {"pid": "raylet", "lines": [note, "raylet: node out of memory"], "is_err": False},
        ignore_prefix=False)
    ray_worker.print_to_stdstream({"pid": 123, "ip": "1.2.3.4", "task_name": "t",
                                   "lines": ["worker says: processes have been started"],
                                   "is_err": False}, ignore_prefix=False)
    out = capsys.readouterr().out
    assert "raylet: node out of memory" in out and "worker says" in out and "PYTHON" not in out


def test_tunes_timing_hints_stay_off_the_driver_console():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    code = """
import logging
from ray.tune.utils.util import warn_if_slow
from imgpipe.logs import TUNE_SLOW_LOGGERS, configure_console
configure_console(verbose={verbose})
for name in TUNE_SLOW_LOGGERS:
    log = logging.getLogger(name)
    log.warning(warn_if_slow.DEFAULT_MESSAGE.format(name="process_trial_result", duration=1.7))
    log.warning("Trial t errored after 3 iterations")
"""
    quiet = _run(code.format(verbose=False), env)
    assert "performance bottleneck" not in quiet.stderr
    assert quiet.stderr.count("Trial t errored") == 2  # the loggers' other warnings stay
    loud = _run(code.format(verbose=True), env)
    assert loud.stderr.count("performance bottleneck") == 2


def test_tunes_python_resume_advice_stays_off_the_driver_console():
    """After Ctrl-C the jobs print their own --resume command; Tune's Tuner.restore advice
    (its exact wording in ray/tune/tune.py) would contradict it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    code = """
import logging
from imgpipe.logs import TUNE_INTERRUPTED_LOGGER, configure_console
configure_console(verbose={verbose})
log = logging.getLogger(TUNE_INTERRUPTED_LOGGER)
log.warning("Experiment has been interrupted, but the most recent state was saved.\\n"
            "Resume experiment with: Tuner.restore(path='/x', trainable=...)")
log.warning("Trials did not complete: [t]")
"""
    quiet = _run(code.format(verbose=False), env)
    assert "Tuner.restore" not in quiet.stderr
    assert "Trials did not complete" in quiet.stderr  # the logger's other warnings stay
    loud = _run(code.format(verbose=True), env)
    assert "Tuner.restore" in loud.stderr


FORWARDED = """
import ray
from imgpipe.logs import configure_console
from imgpipe.runtime import start_local_ray
{setup}
start_local_ray(num_cpus=1)

@ray.remote
def work():
    print("epoch 1/1 from a worker", flush=True)

ray.get(work.remote())
import time; time.sleep(2)  # the driver's log listener prints forwarded lines asynchronously
ray.shutdown()
"""


@pytest.mark.ray
def test_forwarded_worker_lines_carry_no_colour_codes_into_a_file():
    env = {k: v for k, v in os.environ.items() if k != "RAY_COLOR_PREFIX"}
    out = _run(FORWARDED.format(setup="configure_console()"), env)
    lines = [x for x in (out.stdout + out.stderr).splitlines() if "from a worker" in x]
    assert lines and all("\x1b[" not in x for x in lines), lines  # captured: not a terminal
