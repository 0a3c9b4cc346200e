"""Version numbers and publication of bundles: stage, verify, then claim a number and rename.

``bundles/<name>/`` holds, besides the published ``v<N>/`` folders:
    .staging-<id>/   bundles being written or verified (never loadable as a version)
    .last-version    the highest version number ever issued (so a number is never reused,
                     not even one whose publication failed half-way)
    .publish.lock    serialises version claims between processes (``filelock``)
    .v<N>.lock       serialises read-modify-write updates of ``v<N>/bundle.json``

A version is claimed and renamed into place under the publish lock, so two concurrent exports
get two different numbers and versions appear in increasing order. Locks are advisory file
locks: they hold between processes of one host and on shared filesystems with working POSIX
locks; object stores (``s3://``, ``gs://``) have no atomic claim, see ``publish_to_uri``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from imgpipe import storage

STAGING_PREFIX = ".staging-"
COUNTER_FILE = ".last-version"
PUBLISH_LOCK = ".publish.lock"
LOCK_TIMEOUT_S = 120.0
_VERSION_DIR = re.compile(r"^v([1-9][0-9]*)$")


class VersionClaimError(FileExistsError):
    """The requested version exists or was issued before (versions are never reused)."""


def version_numbers(names: list[str]) -> list[int]:
    return sorted(int(m.group(1)) for n in names if (m := _VERSION_DIR.match(n)))


def local_versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return version_numbers([p.name for p in model_dir.iterdir()])


def last_issued(model_dir: Path) -> int:
    """Highest number ever issued: the counter file, or any ``v<N>`` folder, whichever is higher."""
    counter = model_dir / COUNTER_FILE
    try:
        issued = int(counter.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        issued = 0
    return max([issued, *local_versions(model_dir)])


def new_staging_dir(model_dir: Path) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    path.mkdir()
    return path


def discard(staged: Path) -> None:
    shutil.rmtree(staged, ignore_errors=True)


def publish_lock(model_dir: Path) -> FileLock:
    model_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(str(model_dir / PUBLISH_LOCK), timeout=LOCK_TIMEOUT_S)


def meta_lock(bundle_dir: Path) -> FileLock | contextlib.nullcontext:
    """The lock for read-modify-write updates of one version's ``bundle.json``.

    A staged bundle has a single writer (its exporter) and needs none.
    """
    if bundle_dir.name.startswith(STAGING_PREFIX):
        return contextlib.nullcontext()
    return FileLock(str(bundle_dir.parent / f".{bundle_dir.name}.lock"), timeout=LOCK_TIMEOUT_S)


def _write_counter(model_dir: Path, version: int) -> None:
    tmp = model_dir / f"{COUNTER_FILE}.{uuid.uuid4().hex[:8]}"
    with open(tmp, "w") as f:
        f.write(f"{version}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, model_dir / COUNTER_FILE)


def publish_staged(staged: Path, model_dir: Path, set_version: Callable[[Path, int], None],
                   version: int | None = None) -> Path:
    """Claim the next version (or ``version``) and rename ``staged`` onto ``v<N>``.

    ``set_version(staged, n)`` writes the claimed number into the staged metadata before the
    rename. The counter is advanced before the rename, so a crash in between burns the number
    instead of reusing it.

    Raises:
        VersionClaimError: ``version`` exists already or is not above the last issued number.
    """
    with publish_lock(model_dir):
        last = last_issued(model_dir)
        if version is None:
            version = last + 1
        elif version <= last or (model_dir / f"v{version}").exists():
            raise VersionClaimError(
                f"{model_dir / f'v{version}'} already exists or was issued before (last issued "
                f"v{last}); bundle versions are never overwritten or reused")
        set_version(staged, version)
        _write_counter(model_dir, version)
        final = model_dir / f"v{version}"
        final.mkdir()  # exclusive claim even against writers that ignore the lock
        try:
            os.rename(staged, final)  # rename(2) may replace the empty folder just claimed
        except OSError:
            final.rmdir()
            raise
    return final


def publish_to_uri(staged: Path, root: str, name: str, set_version: Callable[[Path, int], None],
                   meta_file: str) -> str:
    """Upload a verified local bundle to ``<root>/<name>/v<N>`` on an object store.

    N is one above the highest version listed there. Files are uploaded with ``meta_file``
    last, and readers treat a version as complete only once it exists. Object stores offer no
    atomic claim, so two exports racing on the same name and store may pick the same N: run
    concurrent exports against a local or shared filesystem root, or give them distinct names.
    """
    import pyarrow.fs as pafs

    fs, base = storage.resolve_fs(storage.join(root, name))
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    version = max(version_numbers([i.base_name for i in infos]), default=0) + 1
    set_version(staged, version)
    dest = storage.join(root, name, f"v{version}")
    for f in sorted(staged.iterdir(), key=lambda p: p.name == meta_file):
        storage.write_bytes(storage.join(dest, f.name), f.read_bytes())
    return dest
