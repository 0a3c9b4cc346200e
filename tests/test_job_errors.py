"""Every job in jobs/: user mistakes exit 2 with a message, real bugs keep their traceback;
outputs that ``ray job submit`` would lose are refused before any work starts."""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path
from types import ModuleType

import pytest

from imgpipe import storage
from imgpipe.errors import OutputLocationError, UserError

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted(p.stem for p in (REPO / "jobs").glob("*.py"))


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def _user_mistake(name: str, tmp_path: Path) -> list[str]:
    dead = f"127.0.0.1:{_closed_port()}"
    return {
        "prepare_data": ["--dataset", "digits-lt", "--test-per-class", "170",
                         "--out", str(tmp_path / "d")],
        "train": ["--data", str(tmp_path / "d"), "--lr", "-1", "--out", str(tmp_path / "o")],
        "tune": ["--data", str(tmp_path / "mine"), "--out", str(tmp_path / "o")],
        "evaluate": ["--bundle", str(tmp_path / "nowhere"), "--data", str(tmp_path),
                     "--out", str(tmp_path / "o")],
        "serve": ["--bundle", str(tmp_path / "nowhere"), "--address", dead],
        "monitor": ["--config", str(tmp_path / "missing.yaml")],
        "rebalance_classifier": ["--config", str(tmp_path / "missing.yaml")],
        "rank_checkpoints": ["--config", str(tmp_path / "missing.yaml")],
    }[name]


# The function each job calls first with the parsed arguments: a bug planted there must surface.
FIRST_CALL = {"prepare_data": "parse_job_args", "train": "parse_job_args",
              "tune": "parse_job_args", "evaluate": "parse_job_args",
              "serve": "resolve_serve_args", "monitor": "resolve_config",
              "rebalance_classifier": "parse_job_args", "rank_checkpoints": "parse_job_args"}


def test_every_job_is_covered():
    assert set(JOBS) == set(FIRST_CALL)


@pytest.mark.parametrize("name", JOBS)
def test_user_mistake_exits_2_with_a_message(name, tmp_path, capsys):
    code = _load(name).main(_user_mistake(name, tmp_path))
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{name}: error:" in err and "Traceback" not in err


@pytest.mark.parametrize("exc", [ValueError, KeyError, FileNotFoundError])
@pytest.mark.parametrize("name", JOBS)
def test_a_bug_keeps_its_traceback(name, exc, monkeypatch):
    job = _load(name)

    def planted_bug(*args, **kwargs):
        raise exc("planted bug")

    monkeypatch.setattr(job, FIRST_CALL[name], planted_bug)
    with pytest.raises(exc, match="planted bug"):
        job.main(_user_mistake(name, Path("/nonexistent")))


def test_dead_address_is_named_with_the_fix(capsys):
    dead = f"127.0.0.1:{_closed_port()}"
    assert _load("tune").main(["--address", dead, "--out", "/tmp/x", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert dead in err and "ray start --head" in err and "without --address" in err


# --- ray job submit: outputs in the temporary working-dir copy are refused ----------------------

def _as_submitted_job(monkeypatch, workdir: Path) -> None:
    """What Ray's job supervisor sets up for `ray job submit --working-dir .`."""
    monkeypatch.setenv(storage.RAY_JOB_CONFIG_ENV, json.dumps(
        {"runtime_env": {"working_dir": "gcs://_ray_pkg_abc.zip"}, "metadata": {}}))
    monkeypatch.chdir(workdir)


def test_relative_outputs_of_a_submitted_job_are_refused(tmp_path, monkeypatch):
    work = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    work.mkdir(parents=True)
    _as_submitted_job(monkeypatch, work)
    with pytest.raises(OutputLocationError, match="--out runs/tune .*--bundle-root bundles"):
        storage.check_durable({"--out": "runs/tune", "--bundle-root": "bundles",
                               "--storage-path": None})
    # durable locations pass: a URI, or an absolute path outside the copy
    storage.check_durable({"--out": "s3://bucket/runs", "--bundle-root": str(tmp_path / "b")})


def test_submitted_tune_job_refuses_before_starting_ray(tmp_path, monkeypatch, capsys):
    _as_submitted_job(monkeypatch, tmp_path)
    code = _load("tune").main(["--data", str(tmp_path / "d"), "--dataset", "digits-lt"])
    err = capsys.readouterr().err
    assert code == 2 and "ray job submit" in err and "s3://" in err
    assert not (tmp_path / "d").exists()


def test_outside_a_submitted_job_nothing_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(storage.RAY_JOB_CONFIG_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert storage.job_working_dir() is None
    storage.check_durable({"--out": "runs/x"})


def test_storage_writes_through_pyarrow_uris(tmp_path):
    uri = f"file://{tmp_path}/bucket/run"
    assert storage.write_json(storage.join(uri, "results.json"), {"a": 1}) == f"{uri}/results.json"
    assert json.loads((tmp_path / "bucket" / "run" / "results.json").read_text()) == {"a": 1}
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "f.txt").write_text("x")
    storage.upload_dir(tmp_path / "local", storage.join(uri, "copy"))
    assert storage.read_bytes(storage.join(uri, "copy", "f.txt")) == b"x"
    with pytest.raises(UserError, match="unsupported location"):
        storage.resolve_fs("nope://x")


def test_pyarrow_subtree_filesystem_location(tmp_path):
    """Ray Train accepts a (path, pyarrow filesystem) pair too; our helpers resolve the same."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve_fs(str(tmp_path / "a"))
    sub = pafs.SubTreeFileSystem(path, fs)
    sub.create_dir("x")
    with sub.open_output_stream("x/y.json") as f:
        f.write(b"{}")
    assert storage.read_bytes(str(tmp_path / "a" / "x" / "y.json")) == b"{}"
    assert storage.absolute_location("rel/p") == str(Path("rel/p").resolve())
