"""Publishing run outputs to shared storage: run folders and zipped bundles, local or URI
(``cluster/publish.py``)."""

from __future__ import annotations

import json
import tempfile
import zipfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

BUNDLE_META = "bundle.json"  # imgpipe.bundle.META_FILE; not imported: that pulls in torch


def find_bundles(root: str | Path) -> list[Path]:
    """Complete bundle versions ``root/<name>/v<N>`` (those holding a ``bundle.json``)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.parent for p in root.glob(f"*/v*/{BUNDLE_META}"))


def pack_bundle(bundle_dir: str | Path, zip_path: str | Path) -> Path:
    """Zip a bundle so that Ray's remote ``working_dir`` unpacks it as ``bundles/<name>/v<N>``.

    Ray strips a remote zip's single top-level folder, so the archive holds
    ``<name>-v<N>/bundles/<name>/v<N>/...``: a Serve app whose runtime_env working_dir is this
    zip finds the bundle at the same relative path it has in a local checkout.
    """
    bundle_dir, zip_path = Path(bundle_dir), Path(zip_path)
    name, version = bundle_dir.parent.name, bundle_dir.name
    prefix = Path(f"{name}-{version}") / "bundles" / name / version
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
            zf.write(f, (prefix / f.relative_to(bundle_dir)).as_posix())
    return zip_path


def publish(dest: str, runs: Iterable[str | Path] = (), bundles_root: str | Path | None = None,
            stamp: str | None = None) -> dict[str, Any]:
    """Copy run folders and zipped bundles to ``dest/<stamp>/`` on local disk, s3:// or gs://.

    A job's working directory on a cluster is a temporary copy on one node, so whatever
    ``jobs/tune.py`` writes there (``runs/...``, ``bundles/...``) is lost with the cluster unless
    it is copied out. Each call writes under a fresh UTC timestamp and never overwrites.
    Credentials come from the node (instance role / workload identity), never from arguments.

    Returns the manifest also written as ``dest/<stamp>/published.json``.

    Raises:
        FileExistsError: ``dest/<stamp>`` already exists.
        FileNotFoundError: a run folder does not exist.
    """
    from pyarrow import fs as pafs

    stamp = stamp or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    filesystem, base = pafs.FileSystem.from_uri(_as_uri(dest))
    target = f"{base.rstrip('/')}/{stamp}"
    if filesystem.get_file_info(target).type != pafs.FileType.NotFound:
        raise FileExistsError(f"{_join(dest, stamp)} exists; outputs are never overwritten")
    filesystem.create_dir(target)
    manifest: dict[str, Any] = {"dest": _join(dest, stamp), "runs": {}, "bundles": {}}
    for run in map(Path, runs):
        if not run.is_dir():
            raise FileNotFoundError(f"run folder {run} does not exist")
        # Local filesystems need the folder to exist; object stores ignore this.
        filesystem.create_dir(f"{target}/runs/{run.name}")
        pafs.copy_files(str(run.resolve()), f"{target}/runs/{run.name}",
                        destination_filesystem=filesystem)
        manifest["runs"][str(run)] = _join(dest, stamp, "runs", run.name)
    for bundle in find_bundles(bundles_root) if bundles_root else []:
        rel = f"bundles/{bundle.parent.name}/{bundle.name}.zip"
        _upload_zip(bundle, filesystem, f"{target}/{rel}")
        manifest["bundles"][f"{bundle.parent.name}/{bundle.name}"] = _join(dest, stamp, rel)
    with filesystem.open_output_stream(f"{target}/published.json") as out:
        out.write(json.dumps(manifest, indent=2).encode())
    return manifest


def _upload_zip(bundle: Path, filesystem: Any, path: str) -> None:
    from pyarrow import fs as pafs

    with tempfile.TemporaryDirectory() as tmp:
        local = pack_bundle(bundle, Path(tmp) / "bundle.zip")
        filesystem.create_dir(path.rpartition("/")[0])
        pafs.copy_files(str(local), path, destination_filesystem=filesystem)


def _as_uri(dest: str) -> str:
    # pyarrow wants an absolute local path or a URI; accept relative local paths too.
    return dest if "://" in dest else str(Path(dest).resolve())


def _join(dest: str, *parts: str) -> str:
    return "/".join([dest.rstrip("/"), *parts])
