"""The user's own images: image folders and CSV/Parquet manifests, bad files skipped."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imgpipe.config import PrepareConfig
from imgpipe.constants import ID, IMAGE, LABEL, SPLITS, TEST, TRAIN, VAL
from imgpipe.data.ingest import ingest_image_folder, ingest_manifest
from imgpipe.data.manifest import load_manifest
from imgpipe.data.prepare import effective_imbalance_ratio, prepare
from imgpipe.data.shards import read_split_table
from imgpipe.data.splits import long_tail_counts, stratified_assign


def _image_bytes(seed: int, mode: str = "RGB", fmt: str = "PNG", size: int = 10) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _make_tree(root: Path, counts: dict[str, int], mode: str = "RGB", start: int = 0) -> None:
    for k, (cls, n) in enumerate(counts.items()):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / cls / f"img{i:03d}.png").write_bytes(_image_bytes(start + 100 * k + i, mode))


def _counts(records: list[dict], num_classes: int) -> list[int]:
    return np.bincount([r[LABEL] for r in records], minlength=num_classes).tolist()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """3 classes (20, 10, 2 images) + a corrupt PNG, a truncated JPEG and a stray text file."""
    root = tmp_path / "photos"
    _make_tree(root, {"ant": 20, "bee": 10, "cow": 2})
    (root / "ant" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (root / "bee" / "truncated.jpg").write_bytes(_image_bytes(7, fmt="JPEG", size=64)[:300])
    (root / "bee" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_skips_bad_files(tree: Path) -> None:
    data = ingest_image_folder(str(tree), seed=0, val_fraction=0.1, test_fraction=0.2)
    assert data.class_names == ["ant", "bee", "cow"]
    assert data.mode == "RGB"
    assert data.skipped_count == 2
    skipped = {Path(s["path"]).name: s["reason"] for s in data.skipped}
    assert set(skipped) == {"corrupt.png", "truncated.jpg"}
    assert all("cannot" in reason or "truncated" in reason for reason in skipped.values())
    total = [sum(x) for x in zip(*(_counts(data.splits[s], 3) for s in SPLITS), strict=True)]
    assert total == [20, 10, 2]
    # per-class split: round(n * f), at least one, the rest in train; cow is too small
    assert _counts(data.splits[TEST], 3) == [4, 2, 0]
    assert _counts(data.splits[VAL], 3) == [2, 1, 0]
    assert any("cow" in w for w in data.warnings)


def test_image_folder_stores_bytes_as_is(tree: Path) -> None:
    data = ingest_image_folder(str(tree))
    rec = next(r for r in data.splits[TRAIN] if r[ID] == "ant/img000.png")
    assert rec[IMAGE] == (tree / "ant" / "img000.png").read_bytes()


def test_image_folder_split_is_seeded_and_disjoint(tree: Path) -> None:
    def ids(seed: int) -> dict[str, set[str]]:
        d = ingest_image_folder(str(tree), seed=seed)
        return {s: {r[ID] for r in d.splits[s]} for s in SPLITS}

    a, b, c = ids(0), ids(0), ids(1)
    assert a == b and a != c
    assert not (a[TRAIN] & a[VAL] or a[TRAIN] & a[TEST] or a[VAL] & a[TEST])


def test_image_folder_with_split_folders(tmp_path: Path) -> None:
    _make_tree(tmp_path / "train", {"x": 6, "y": 3}, mode="L")
    _make_tree(tmp_path / "val", {"x": 2, "y": 2}, mode="L", start=50)
    _make_tree(tmp_path / "test", {"x": 1, "y": 4}, mode="L", start=90)
    data = ingest_image_folder(str(tmp_path))
    assert data.mode == "L"
    assert [_counts(data.splits[s], 2) for s in SPLITS] == [[6, 3], [2, 2], [1, 4]]
    assert data.warnings == []
    assert {r[ID] for r in data.splits[VAL]} == {"val/x/img000.png", "val/x/img001.png",
                                                 "val/y/img000.png", "val/y/img001.png"}


def test_missing_val_folder_is_carved_from_train(tmp_path: Path) -> None:
    _make_tree(tmp_path / "train", {"x": 10, "y": 10})
    _make_tree(tmp_path / "test", {"x": 2, "y": 2}, start=60)
    data = ingest_image_folder(str(tmp_path), val_fraction=0.2)
    assert _counts(data.splits[VAL], 2) == [2, 2]
    assert _counts(data.splits[TRAIN], 2) == [8, 8]
    assert _counts(data.splits[TEST], 2) == [2, 2]
    assert any("no val split given" in w for w in data.warnings)


def test_train_folder_next_to_class_folders_is_ambiguous(tmp_path: Path) -> None:
    _make_tree(tmp_path / "train", {"x": 2, "y": 2})
    _make_tree(tmp_path, {"z": 2})
    with pytest.raises(ValueError, match=r"train/ and also \['z'\]"):
        ingest_image_folder(str(tmp_path))


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        ingest_image_folder(str(tmp_path / "nope"))
    _make_tree(tmp_path / "one", {"only": 3})
    with pytest.raises(ValueError, match="at least 2"):
        ingest_image_folder(str(tmp_path / "one"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        ingest_image_folder(str(tmp_path / "empty"))


def test_natural_imbalance_by_default_long_tail_on_request(tmp_path: Path) -> None:
    _make_tree(tmp_path, {"a": 12, "b": 30, "c": 20})
    natural = ingest_image_folder(str(tmp_path), test_fraction=0.1)
    train = _counts(natural.splits[TRAIN], 3)
    tail = ingest_image_folder(str(tmp_path), test_fraction=0.1, imbalance_ratio=5.0)
    got = _counts(tail.splits[TRAIN], 3)
    # ranked by size: b (head), c, a (tail); n_max is the largest head all ranks can supply
    ranked = sorted(range(3), key=lambda c: -train[c])
    n_max = int(min(train[c] * 5.0 ** (r / 2) for r, c in enumerate(ranked)))
    assert [got[c] for c in ranked] == long_tail_counts(n_max, 3, 5.0)
    assert _counts(tail.splits[TEST], 3) == _counts(natural.splits[TEST], 3)  # eval untouched
    assert tail.imbalance_ratio == 5.0 and natural.imbalance_ratio is None


def test_effective_ratio_only_when_given_for_own_data() -> None:
    assert effective_imbalance_ratio(PrepareConfig(image_folder="x")) is None
    assert effective_imbalance_ratio(PrepareConfig(image_folder="x", imbalance_ratio=100)) == 100
    assert effective_imbalance_ratio(PrepareConfig(dataset="digits-lt")) == 100


def test_stratified_assign_keeps_one_train_row() -> None:
    labels = np.array([0] * 3 + [1] * 2 + [2] * 50)
    splits, small = stratified_assign(labels, {TEST: 0.45, VAL: 0.45}, seed=0)
    assert small == [1]
    for c in (0, 2):
        assert set(splits[labels == c]) == {TRAIN, VAL, TEST}


def _write_csv(path: Path, rows: list[tuple[str, ...]], header: str) -> None:
    path.write_text(header + "\n" + "\n".join(",".join(r) for r in rows) + "\n")


def test_csv_manifest(tmp_path: Path) -> None:
    _make_tree(tmp_path / "imgs", {"red": 4, "blue": 3}, mode="L")
    rows = [(f"imgs/red/img{i:03d}.png", "red", "train") for i in range(3)]
    rows += [("imgs/red/img003.png", "red", "test"), ("imgs/missing.png", "blue", "train")]
    rows += [(str(tmp_path / f"imgs/blue/img{i:03d}.png"), "blue", s)  # absolute paths work too
             for i, s in enumerate(["train", "val", "test"])]
    _write_csv(tmp_path / "list.csv", rows, "path,label,split")
    data = ingest_manifest(str(tmp_path / "list.csv"))
    assert data.class_names == ["blue", "red"] and data.mode == "L"
    assert [_counts(data.splits[s], 2) for s in (TRAIN, TEST)] == [[1, 3], [1, 1]]
    # val exists (for blue), so it is not carved; red's lack of val rows is reported
    assert _counts(data.splits[VAL], 2) == [1, 0]
    assert "no val images for classes ['red']" in data.warnings
    assert data.skipped_count == 1 and "missing.png" in data.skipped[0]["path"]
    assert data.source == f"manifest:{tmp_path / 'list.csv'}"


def test_parquet_manifest_without_split(tmp_path: Path) -> None:
    _make_tree(tmp_path, {"1": 5, "10": 5, "2": 5})
    paths = [f"{c}/img{i:03d}.png" for c in ("1", "10", "2") for i in range(5)]
    labels = [int(p.split("/")[0]) for p in paths]  # integer labels become names
    pq.write_table(pa.table({"path": paths, "label": labels}), tmp_path / "m.parquet")
    data = ingest_manifest(str(tmp_path / "m.parquet"), test_fraction=0.2, val_fraction=0.2)
    assert data.class_names == ["1", "2", "10"]  # numeric order
    assert [_counts(data.splits[s], 3) for s in SPLITS] == [[3, 3, 3], [1, 1, 1], [1, 1, 1]]


@pytest.mark.parametrize(("header", "rows", "message"), [
    ("file,label", [("a.png", "x")], "lacks column"),
    ("path,label,split", [("a.png", "x", "holdout")], "unknown split 'holdout'"),
    ("path,label,split", [("a.png", "x", "train"), ("b.png", "y", "")], "split is empty"),
])
def test_bad_manifest(tmp_path: Path, header: str, rows: list, message: str) -> None:
    _write_csv(tmp_path / "m.csv", rows, header)
    with pytest.raises(ValueError, match=message):
        ingest_manifest(str(tmp_path / "m.csv"))


def test_prepare_own_folder_writes_skips(tree: Path, tmp_path: Path) -> None:
    cfg = PrepareConfig(image_folder=str(tree), out=str(tmp_path / "shards"), rows_per_shard=8)
    manifest = prepare(cfg)
    assert manifest.skipped.count == 2 and len(manifest.skipped.examples) == 2
    assert manifest.imbalance_ratio is None
    assert manifest.image.mode == "RGB" and manifest.image.height == 10
    assert manifest.counts_vector(TRAIN) == [14, 7, 2]
    assert load_manifest(cfg.out) == manifest
    assert read_split_table(cfg.out, TEST).num_rows == 6


def test_prepare_refuses_out_inside_image_folder(tree: Path) -> None:
    cfg = PrepareConfig(image_folder=str(tree), out=str(tree / "shards"))
    with pytest.raises(ValueError, match="inside image_folder"):
        prepare(cfg)


def test_prepare_own_data_reused_by_ensure_prepared(tree: Path, tmp_path: Path) -> None:
    from imgpipe.data.prepare import ensure_prepared

    cfg = PrepareConfig(image_folder=str(tree), out=str(tmp_path / "s"))
    first = ensure_prepared(cfg)
    assert first.source == f"image-folder:{tree}"
    assert ensure_prepared(cfg).created_at == first.created_at
    tail = ensure_prepared(cfg.model_copy(update={"imbalance_ratio": 5.0}))
    assert tail.imbalance_ratio == 5.0


def test_missing_manifest_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        ingest_manifest(str(tmp_path / "nope.csv"))
