"""Parquet shard format and manifest.json: schema, shuffling, round trip, errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgpipe import storage
from imgpipe.constants import ID, IMAGE, LABEL, LABEL_NAME, MANIFEST_FILE, SHARD_SCHEMA_VERSION
from imgpipe.data.datasets import encode_png, make_record
from imgpipe.data.manifest import Manifest, ManifestError, load_manifest
from imgpipe.data.shards import read_split_table, split_files, split_rows, write_shards

CLASSES = ["cat", "dog", "owl"]


def _records(counts: list[int], prefix: str, rgb: bool = False) -> list[dict]:
    rng = np.random.default_rng(len(prefix))
    out = []
    for label, n in enumerate(counts):
        for k in range(n):
            shape = (4, 6, 3) if rgb else (4, 6)
            px = rng.integers(0, 256, size=shape, dtype=np.uint8)
            out.append(make_record(encode_png(px), label, CLASSES, f"{prefix}-{label}-{k}"))
    return out


@pytest.fixture
def written(tmp_path: Path) -> tuple[str, Manifest, dict]:
    data = {"train": _records([40, 12, 3], "tr"), "val": _records([2, 2, 0], "va"),
            "test": _records([3, 3, 3], "te")}
    meta = {"source": "unit", "seed": 7, "imbalance_ratio": 10.0,
            "skipped": [{"path": f"bad{i}.png", "reason": "corrupt"} for i in range(30)],
            "skipped_count": 30, "warnings": ["w1"], "config": {"seed": 7}}
    out = str(tmp_path / "shards")
    return out, write_shards(out, data, CLASSES, meta, rows_per_shard=16), data


def test_shard_schema_and_layout(written) -> None:
    out, manifest, _ = written
    assert manifest.files["train"] == [f"train/part-{k:05d}.parquet" for k in range(4)]
    assert manifest.files["val"] == ["val/part-00000.parquet"]
    for rel in manifest.files["train"]:
        meta = pq.ParquetFile(Path(out) / rel)
        schema = meta.schema_arrow
        assert schema.field(IMAGE).type == pa.binary()
        assert schema.field(LABEL).type == pa.int64()
        assert schema.field(LABEL_NAME).type == pa.string()
        assert schema.field(ID).type == pa.string()
        assert meta.metadata.num_rows <= 16


def test_manifest_content(written) -> None:
    out, manifest, data = written
    assert manifest.schema_version == SHARD_SCHEMA_VERSION
    assert manifest.class_names == CLASSES
    assert manifest.counts["val"] == {"cat": 2, "dog": 2, "owl": 0}  # zero counts kept
    assert manifest.counts_vector("train") == [40, 12, 3]
    assert manifest.num_rows == {"train": 55, "val": 4, "test": 9}
    assert manifest.image.model_dump() == {"height": 4, "width": 6, "mode": "L"}
    assert manifest.seed == 7 and manifest.imbalance_ratio == 10.0
    assert manifest.skipped.count == 30 and len(manifest.skipped.examples) == 20
    pixels = np.concatenate([np.asarray(Image.open(io.BytesIO(r[IMAGE]))).ravel()
                             for r in data["train"]]) / 255.0
    assert manifest.pixel_mean == pytest.approx([pixels.mean()], abs=1e-5)
    assert manifest.pixel_std == pytest.approx([pixels.std()], abs=1e-5)
    on_disk = json.loads((Path(out) / MANIFEST_FILE).read_text())
    assert on_disk["counts"]["train"] == {"cat": 40, "dog": 12, "owl": 3}


def test_round_trip(written) -> None:
    out, manifest, data = written
    assert load_manifest(out) == manifest
    for split, records in data.items():
        table = read_split_table(out, split)
        assert table.num_rows == len(records)
        got = {r[ID]: r for r in table.to_pylist()}
        assert got == {r[ID]: r for r in records}  # bytes stored as given, labels intact


def test_rows_are_shuffled_across_files(written) -> None:
    out, manifest, data = written
    per_file = [pq.read_table(Path(out) / rel)[LABEL].to_pylist()
                for rel in manifest.files["train"]]
    # 40 cats, 12 dogs, 3 owls in 4 files of ≤16 rows: unshuffled, the first two files would be
    # all cats; shuffled, every full file mixes at least two classes.
    assert all(len(set(labels)) >= 2 for labels in per_file[:3])
    ids = [i for rel in manifest.files["train"] for i in pq.read_table(Path(out) / rel)[ID]
           .to_pylist()]
    assert ids != [r[ID] for r in data["train"]]


def test_shuffle_is_seeded(tmp_path: Path) -> None:
    data = {"train": _records([10, 10, 10], "tr")}
    order = []
    for name in ("a", "b"):
        write_shards(str(tmp_path / name), data, CLASSES, {"source": "u", "seed": 1})
        order.append(read_split_table(str(tmp_path / name), "train")[ID].to_pylist())
    assert order[0] == order[1]


def test_rgb_mode_detected_and_empty_split(tmp_path: Path) -> None:
    data = {"train": _records([3, 1, 1], "tr", rgb=True), "test": []}
    m = write_shards(str(tmp_path), data, CLASSES, {"source": "u"})
    assert m.image.mode == "RGB" and len(m.pixel_mean) == 3
    assert m.counts["test"] == {"cat": 0, "dog": 0, "owl": 0}
    assert read_split_table(str(tmp_path), "test").num_rows == 0


def test_rewrite_removes_stale_parts(tmp_path: Path) -> None:
    write_shards(str(tmp_path), {"train": _records([30, 5, 5], "tr")}, CLASSES, {"source": "u"},
                 rows_per_shard=8)
    m = write_shards(str(tmp_path), {"train": _records([3, 1, 1], "tr")}, CLASSES,
                     {"source": "u"}, rows_per_shard=8)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["part-00000.parquet"]
    assert m.num_rows["train"] == 5


def test_file_uri(written) -> None:
    out, manifest, _ = written
    uri = Path(out).as_uri()
    assert load_manifest(uri) == manifest
    assert read_split_table(uri, "test").num_rows == 9
    assert split_files(uri, "val") == [uri + "/val/part-00000.parquet"]
    fs, path = storage.resolve_fs(uri)
    assert path == out


def test_write_to_file_uri(tmp_path: Path) -> None:
    uri = (tmp_path / "u").as_uri()
    write_shards(uri, {"train": _records([2, 2, 2], "tr")}, CLASSES, {"source": "u"})
    assert load_manifest(str(tmp_path / "u")).num_rows == {"train": 6}


def test_rejects_mismatched_labels(tmp_path: Path) -> None:
    bad = _records([1, 1, 1], "tr")
    bad[0][LABEL_NAME] = "dog"
    with pytest.raises(ValueError, match="class_names"):
        write_shards(str(tmp_path), {"train": bad}, CLASSES, {"source": "u"})


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=rf"{tmp_path}.*manifest.json: not found"):
        load_manifest(str(tmp_path))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.update(schema_version=99), "schema_version 99 is not supported"),
    (lambda d: d.pop("class_names"), "class_names: Field required"),
    (lambda d: d["num_rows"].update(train=1), "num_rows.train"),
    (lambda d: d.update(surprise=1), "surprise"),
])
def test_invalid_manifest(written, edit, message: str) -> None:
    out, _, _ = written
    path = Path(out) / MANIFEST_FILE
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message) as info:
        load_manifest(out)
    assert str(path) in str(info.value)


def test_manifest_not_json(written) -> None:
    out, _, _ = written
    (Path(out) / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(out)


def test_partial_directory_detected(written) -> None:
    out, manifest, _ = written
    (Path(out) / manifest.files["train"][-1]).unlink()
    with pytest.raises(ManifestError, match="missing"):
        read_split_table(out, "train")
    with pytest.raises(ManifestError, match="no split 'extra'"):
        read_split_table(out, "extra")


def test_preprocess_from_manifest(written) -> None:
    _, manifest, _ = written
    pre = manifest.preprocess(32)
    assert pre.mode == "L" and pre.image_size == 32 and pre.mean == tuple(manifest.pixel_mean)


def test_split_rows_from_footers_and_stale_directories(written, monkeypatch) -> None:
    import pyarrow.parquet as pq
    import ray.data

    from imgpipe.data.pipeline import build_decoded

    out, manifest, data = written
    assert split_rows(out, "train") == manifest.num_rows["train"] == len(data["train"])
    # a shard rewritten with fewer rows (a prepare re-run mid-training, a partial copy)
    last = Path(out) / manifest.files["train"][-1]
    pq.write_table(pq.read_table(last).slice(0, 1), last)
    with pytest.raises(ManifestError, match="rows on disk but the manifest says"):
        split_rows(out, "train")
    # the train/val decode refuses it before any Ray work (it would count rows as corrupt)
    def no_read(*args, **kwargs):
        raise AssertionError("read_parquet called before the row check")

    monkeypatch.setattr(ray.data, "read_parquet", no_read)
    with pytest.raises(ManifestError, match="rows on disk"):
        build_decoded(out, "train", manifest.preprocess(16), cache=True)
    last.unlink()
    with pytest.raises(ManifestError, match="missing"):
        split_rows(out, "train")
