"""Outputs written by renaming a temporary file or folder get the permissions a plain
``open``/``mkdir`` would give them (``tempfile`` makes owner-only ones), so a server or a
colleague reading a run's results and checkpoint is not refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from imgpipe import storage
from imgpipe.training.trainer import _publish_best


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_and_published_checkpoints_have_plain_permissions(tmp_path):
    plain_file = tmp_path / "plain.json"
    plain_file.write_text("{}")
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()

    written = Path(storage.write_json(str(tmp_path / "out" / "results.json"), {"a": 1}))
    assert mode(written) == mode(plain_file) == storage.default_mode()

    src = tmp_path / "src"
    src.mkdir()
    (src / "meta.json").write_text("{}")
    for _ in range(2):  # a first publication, then one that replaces it
        best = Path(_publish_best(str(src), str(tmp_path / "out" / "best")))
        assert mode(best) == mode(plain_dir) == storage.default_mode(directory=True)
        assert mode(best / "meta.json") == mode(plain_file)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["best", "results.json"]
