"""jobs/prepare_data.py end to end, and prepare/ensure_prepared reuse."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from imgpipe.config import ConfigError, PrepareConfig
from imgpipe.constants import MANIFEST_FILE
from imgpipe.data.manifest import load_manifest
from imgpipe.data.prepare import ensure_prepared, prepare, resolve_out
from imgpipe.data.shards import read_split_table
from imgpipe.data.splits import long_tail_counts

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "prepare_data.py"


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOB), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def job() -> ModuleType:
    """The job module, loaded in-process (cheaper than a subprocess per case)."""
    spec = importlib.util.spec_from_file_location("prepare_data_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_digits_lt(tmp_path: Path) -> None:
    """The documented command, as a real subprocess from the repository root."""
    out = tmp_path / "digits-lt"
    proc = _run("--dataset", "digits-lt", "--imbalance-ratio", "100", "--seed", "0",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["source"] == "digits-lt" and manifest["imbalance_ratio"] == 100
    assert list(manifest["counts"]["train"].values()) == long_tail_counts(104, 10, 100)
    assert manifest["num_rows"] == {"train": 254, "val": 200, "test": 500}
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["class", "train", "val", "test"]
    assert lines[1].split() == ["0", "104", "20", "50"]
    assert "skipped: 0" in proc.stdout
    assert read_split_table(str(out), "train").num_rows == 254


def test_cli_yaml_config_and_override(job: ModuleType, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "prep.yaml"
    cfg.write_text("dataset: shapes-lt\nnum_classes: 3\nimages_per_class: 8\nimage_size: 12\n"
                   "val_per_class: 1\ntest_per_class: 2\nimbalance_ratio: 4\n")
    assert job.main(["--config", str(cfg), "--num-classes", "4", "--out",
                     str(tmp_path / "s")]) == 0
    manifest = load_manifest(str(tmp_path / "s"))
    assert manifest.counts_vector("train") == long_tail_counts(8, 4, 4)
    assert manifest.image.model_dump() == {"height": 12, "width": 12, "mode": "RGB"}
    assert manifest.config["num_classes"] == 4  # the resolved config is saved with the data
    assert "red-circle" in capsys.readouterr().out


def test_cli_bad_value_subprocess(tmp_path: Path) -> None:
    proc = _run("--dataset", "digits-lt", "--imbalance-ratio", "0.5", "--out", str(tmp_path / "x"))
    assert proc.returncode != 0
    assert "imbalance_ratio" in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("args", "field"), [
    (["--dataset", "shapes-lt", "--num-classes", "1"], "num_classes"),
    (["--dataset", "digits-lt", "--val-per-class", "0"], "val_per_class"),
    (["--image-folder", "photos"], "out: required"),
    (["--dataset", "digits-lt", "--config", "missing.yaml"], "missing.yaml"),
])
def test_cli_bad_config_fails_before_work(job: ModuleType, tmp_path: Path, capsys,
                                          args: list[str], field: str) -> None:
    assert job.main(args) == 2
    assert field in capsys.readouterr().err


def test_cli_data_error_exits_nonzero(job: ModuleType, tmp_path: Path, capsys) -> None:
    code = job.main(["--dataset", "digits-lt", "--test-per-class", "170", "--out",
                     str(tmp_path / "d")])
    assert code == 2  # a user mistake: a message, no traceback
    assert "test_per_class" in capsys.readouterr().err


def test_resolve_out_defaults() -> None:
    assert resolve_out(PrepareConfig(dataset="shapes-lt")).out == "data/shapes-lt"
    assert resolve_out(PrepareConfig(dataset="digits-lt", out="elsewhere")).out == "elsewhere"
    with pytest.raises(ConfigError, match="out: required"):
        resolve_out(PrepareConfig(image_folder="photos"))


def test_ensure_prepared_reuses_matching(tmp_path: Path) -> None:
    cfg = PrepareConfig(dataset="shapes-lt", num_classes=3, images_per_class=6, image_size=8,
                        val_per_class=1, test_per_class=1, out=str(tmp_path / "d"))
    first = ensure_prepared(cfg)
    assert ensure_prepared(cfg).created_at == first.created_at  # reused, not rewritten
    changed = cfg.model_copy(update={"seed": 1})
    assert ensure_prepared(changed).seed == 1
    bigger = changed.model_copy(update={"num_classes": 4})
    assert len(ensure_prepared(bigger).class_names) == 4


def test_ensure_prepared_repairs_incomplete(tmp_path: Path) -> None:
    cfg = PrepareConfig(dataset="shapes-lt", num_classes=2, images_per_class=4, image_size=8,
                        val_per_class=1, test_per_class=1, out=str(tmp_path / "d"))
    manifest = prepare(cfg)
    (tmp_path / "d" / manifest.files["val"][0]).unlink()
    ensure_prepared(cfg)
    assert read_split_table(cfg.out, "val").num_rows == 2
