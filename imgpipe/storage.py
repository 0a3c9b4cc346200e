"""Durable output locations: local paths or URIs (``s3://``, ``gs://``, ``file://``) via pyarrow.

Jobs write their artifacts (results, checkpoints, bundles, reports) through these helpers so the
same flag takes a local folder or a bucket. ``check_durable`` refuses, before any work starts,
an output that would land only in the temporary copy of the working directory that
``ray job submit --working-dir`` runs the job in (it disappears with the Ray session).
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from imgpipe.errors import OutputLocationError

# Set by Ray's job supervisor for the entrypoint of `ray job submit` (runtime env + metadata).
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
_WORKING_DIR_MARK = f"{os.sep}runtime_resources{os.sep}working_dir_files{os.sep}"


def _process_umask() -> int:
    """This process's umask. Read once, at import: setting it to read it back (the only
    portable way) would briefly change it for every thread."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()


def default_mode(directory: bool = False) -> int:
    """The permission bits ``open``/``mkdir`` would give a new file or folder here (0o666 or
    0o777 less the umask). ``tempfile`` creates owner-only ones, which a file we publish by
    renaming one must not keep: a server or colleague reading the output would be refused."""
    return (0o777 if directory else 0o666) & ~_UMASK


def is_uri(location: str) -> bool:
    return "://" in location


def absolute_location(location: str) -> str:
    """A URI unchanged; a local path made absolute (``~`` expanded), so logs name it exactly."""
    if is_uri(location):
        return location
    return str(Path(location).expanduser().resolve())


def resolve_fs(location: str, error: type[Exception] = OutputLocationError
               ) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or a URI pyarrow understands
    (``s3://``, ``gs://``, ``file://``, ...); a local path is made absolute.

    Raises:
        error: an empty location or an unsupported scheme (``OutputLocationError`` for an
            output; readers pass ``DataSourceError``).
    """
    if not location:
        raise error("empty location")
    if is_uri(location):
        try:
            fs, path = pafs.FileSystem.from_uri(location)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise error(f"{location}: unsupported location ({e})") from None
        return fs, path.rstrip("/") or "/"
    return pafs.LocalFileSystem(), absolute_location(location)


def join(location: str, *parts: str) -> str:
    """Join parts onto a local path or URI, keeping the scheme."""
    if is_uri(location):
        return posixpath.join(location.rstrip("/"), *parts)
    return os.path.join(location, *parts)


def write_bytes(location: str, data: bytes) -> str:
    """Write ``data`` to a file location (parents created); returns the absolute location.

    Local files are written to a temporary sibling and renamed, so a reader never sees half
    a file; object stores publish an object only when its upload completes.
    """
    fs, path = resolve_fs(location)
    fs.create_dir(posixpath.dirname(path) if is_uri(location) else os.path.dirname(path),
                  recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, default_mode())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)
    return absolute_location(location)


def write_json(location: str, payload: dict[str, Any]) -> str:
    return write_bytes(location, json.dumps(payload, indent=2, default=str).encode())


def read_bytes(location: str) -> bytes:
    fs, path = resolve_fs(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(location: str) -> bool:
    fs, path = resolve_fs(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def upload_dir(local_dir: str | Path, location: str) -> str:
    """Copy a local folder's contents to ``location`` (local or URI); returns it absolute."""
    fs, path = resolve_fs(location)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(Path(local_dir).resolve()), path,
                    source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return absolute_location(location)


def job_working_dir() -> Path | None:
    """The temporary working-dir copy this process runs in under ``ray job submit``, or None."""
    cwd = Path.cwd()
    raw = os.environ.get(RAY_JOB_CONFIG_ENV)
    if raw:
        try:
            runtime_env = json.loads(raw).get("runtime_env") or {}
        except (json.JSONDecodeError, AttributeError):
            runtime_env = {}
        if runtime_env.get("working_dir"):
            return cwd
    if _WORKING_DIR_MARK in f"{cwd}{os.sep}":
        return cwd
    return None


def check_durable(outputs: dict[str, str | None]) -> None:
    """Refuse outputs that would be lost with a ``ray job submit`` working-dir copy.

    ``outputs`` maps a flag (``--out``) to its location. Raises OutputLocationError naming every
    such flag and the fix; does nothing outside a submitted job.
    """
    workdir = job_working_dir()
    if workdir is None:
        return
    lost = []
    for flag, location in outputs.items():
        if not location or is_uri(location):
            continue
        path = Path(absolute_location(location))
        if path == workdir or workdir in path.parents:
            lost.append(f"{flag} {location} (-> {path})")
    if lost:
        raise OutputLocationError(
            "this job runs under `ray job submit --working-dir` in a temporary copy of the "
            f"working directory ({workdir}) that Ray deletes with the session, so these outputs "
            f"would be lost: {'; '.join(lost)}. Pass durable locations instead: an s3:// or "
            "gs:// URI, or an absolute path on storage every node shares, e.g. "
            "--out s3://BUCKET/imgpipe/runs/x --bundle-root s3://BUCKET/imgpipe/bundles "
            "--storage-path s3://BUCKET/imgpipe/ray-results")
