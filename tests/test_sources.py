"""Image-folder and manifest ingest: debris, classes that must not vanish, class order (issue 10, B)."""

from __future__ import annotations

import io
import itertools
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgpipe.config import PrepareConfig
from imgpipe.constants import LABEL, SPLITS, TRAIN, VAL
from imgpipe.data.ingest import ingest_image_folder, ingest_manifest
from imgpipe.data.manifest import load_manifest
from imgpipe.data.prepare import prepare
from imgpipe.data.sources import is_debris, look_alike_classes, sort_class_names


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def put(root: Path, rel: str, data: bytes = b"x") -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)


def images(root: Path, folder: str, n: int, seed: int = 0) -> None:
    for i in range(n):
        put(root, f"{folder}/img{i}.png", png(seed * 100 + i))


def totals(data) -> dict[str, int]:
    counts = np.zeros(len(data.class_names), int)
    for s in SPLITS:
        counts += np.bincount([r[LABEL] for r in data.splits[s]], minlength=len(counts))
    return dict(zip(data.class_names, counts.tolist(), strict=True))


DEBRIS = [  # every one a file that must be ignored and counted
    "__MACOSX/train/cat/._img0.png", "__MACOSX/train/cat/img9.png", "__MACOSX/._train",
    "train/cat/.DS_Store", ".DS_Store", "train/cat/._img0.png", "train/dog/Thumbs.db",
    "val/desktop.ini", "train/dog/.ipynb_checkpoints/img0-checkpoint.png",
    "train/.hidden/img0.png", "train/cat/.cache/thumb.png", ".ipynb_checkpoints/x.ipynb",
]


def test_split_layout_with_macosx_and_notebook_debris(tmp_path):
    """The reported case: a train/ val/ tree unzipped on a Mac (with __MACOSX/) is accepted."""
    images(tmp_path, "train/cat", 6, 1)
    images(tmp_path, "train/dog", 5, 2)
    images(tmp_path, "val/cat", 2, 3)
    images(tmp_path, "val/dog", 2, 4)
    for rel in DEBRIS:
        put(tmp_path, rel, png(99))
    data = ingest_image_folder(str(tmp_path), test_fraction=0.2)
    assert data.class_names == ["cat", "dog"]
    assert totals(data) == {"cat": 8, "dog": 7}
    assert data.ignored == {"os_debris": len(DEBRIS)}
    assert any(f"ignored {len(DEBRIS)} OS/notebook debris" in w for w in data.warnings)
    assert len(data.splits[VAL]) == 4


def test_flat_layout_debris_never_becomes_a_class(tmp_path):
    images(tmp_path, "cat", 3, 1)
    images(tmp_path, "dog", 3, 2)
    for rel in ("__MACOSX/cat/img0.png", "__MACOSX/bird/img0.png", ".Trash/bird/x.png",
                "$RECYCLE.BIN/bird/x.png", "@eaDir/cat/SYNOFILE_THUMB_M.png"):
        put(tmp_path, rel, png(7))
    put(tmp_path, "README.txt")
    data = ingest_image_folder(str(tmp_path))
    assert data.class_names == ["cat", "dog"] and totals(data) == {"cat": 3, "dog": 3}
    assert data.ignored == {"os_debris": 5, "outside_class_folders": 1}


def test_manifest_debris_rows_are_ignored_and_counted(tmp_path):
    images(tmp_path, "cat", 3, 1)
    images(tmp_path, "dog", 3, 2)
    put(tmp_path, "__MACOSX/cat/._img0.png", b"\x00\x05\x16\x07")  # AppleDouble, not a PNG
    rows = [f"cat/img{i}.png,cat" for i in range(3)] + [f"dog/img{i}.png,dog" for i in range(3)]
    rows += ["__MACOSX/cat/._img0.png,cat", "cat/._img1.png,cat",
             ".ipynb_checkpoints/img0-checkpoint.png,dog", "cat/img0.png,cat"]
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    data = ingest_manifest(str(tmp_path / "m.csv"))
    assert totals(data) == {"cat": 3, "dog": 3} and data.skipped_count == 0
    assert data.ignored == {"os_debris": 3, "duplicate_rows": 1}


@pytest.mark.parametrize("name", ["__MACOSX", ".DS_Store", "._img.jpg", ".ipynb_checkpoints",
                                  "Thumbs.db", "desktop.ini", "Desktop.ini", ".git"])
def test_debris_names(name):
    assert is_debris(name)


@pytest.mark.parametrize("name", ["cat", "MACOSX", "_img.jpg", "thumbs", "ipynb_checkpoints"])
def test_not_debris(name):
    assert not is_debris(name)


@pytest.mark.parametrize(("setup", "named"), [
    (lambda r: (r / "rare").mkdir(), "'rare' (empty folder)"),
    (lambda r: [put(r, f"rare/p{i}.heic") for i in range(2)],
     "'rare' (only files without an image extension (2 .heic))"),
    (lambda r: put(r, "rare/bad.png", b"\x89PNG\r\n\x1a\nbroken"), "'rare' (1 image(s), none"),
    (lambda r: put(r, "rare/.DS_Store"), "'rare' (empty folder)"),
])
def test_a_class_without_usable_images_is_an_error_that_names_it(tmp_path, setup, named):
    """The reported case: such a class used to vanish with only "ignored 2 file(s)"."""
    images(tmp_path, "cat", 4, 1)
    images(tmp_path, "dog", 4, 2)
    setup(tmp_path)
    with pytest.raises(ValueError, match="no usable image") as e:
        ingest_image_folder(str(tmp_path))
    assert named in str(e.value)


def test_a_split_class_folder_without_images_is_an_error(tmp_path):
    images(tmp_path, "train/cat", 4, 1)
    images(tmp_path, "train/dog", 4, 2)
    (tmp_path / "val" / "bird").mkdir(parents=True)
    with pytest.raises(ValueError, match="'bird' \\(empty folder\\)"):
        ingest_image_folder(str(tmp_path))


def test_a_manifest_label_without_usable_images_is_an_error(tmp_path):
    images(tmp_path, "cat", 3, 1)
    images(tmp_path, "dog", 3, 2)
    rows = [f"cat/img{i}.png,cat" for i in range(3)] + [f"dog/img{i}.png,dog" for i in range(3)]
    rows += ["missing/a.png,owl", "missing/b.png,owl"]
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="'owl' \\(2 image\\(s\\), none decodable\\)"):
        ingest_manifest(str(tmp_path / "m.csv"))


def test_superscript_folders_ingest_in_a_fixed_order(tmp_path):
    """The reported case: folders 10, 10², 10³ crashed with ``invalid literal for int()``."""
    for k, name in enumerate(["10³", "10", "10²"]):
        images(tmp_path, name, 3, k)
    assert ingest_image_folder(str(tmp_path)).class_names == ["10", "10²", "10³"]


def test_numeric_labels_have_a_total_order_whatever_the_input_order():
    """The reported case: labels 1, 01, 2 got an order that changed with PYTHONHASHSEED."""
    for names in itertools.permutations(["2", "01", "1", "10"]):
        assert sort_class_names(list(names)) == ["01", "1", "2", "10"]
    for names in itertools.permutations(["b", "B", "10", "2", "é", "ß"]):
        assert sort_class_names(set(names)) == ["10", "2", "B", "b", "ß", "é"]
    assert sort_class_names({"-1", "3", "0"}) == ["-1", "0", "3"]
    assert sort_class_names({"١", "2"}) == ["2", "١"]  # non-ASCII digits: code-point order


def test_look_alike_class_names_are_reported(tmp_path):
    assert look_alike_classes(["1", "01", "2", "Cat", "cat", "dog"]) == [["01", "1"],
                                                                           ["Cat", "cat"]]
    images(tmp_path, "1", 3, 1)
    images(tmp_path, "01", 3, 2)
    data = ingest_image_folder(str(tmp_path))
    assert data.class_names == ["01", "1"]
    assert any("['01', '1']" in w for w in data.warnings)


def test_unicode_normalisation_gives_one_name_on_every_machine(tmp_path):
    nfd = unicodedata.normalize("NFD", "café")
    images(tmp_path, nfd, 3, 1)
    images(tmp_path, "tea", 3, 2)
    assert ingest_image_folder(str(tmp_path)).class_names == ["café", "tea"]


def test_manifest_json_records_what_was_ignored(tmp_path):
    src = tmp_path / "src"
    images(src, "cat", 4, 1)
    images(src, "dog", 4, 2)
    put(src, "__MACOSX/cat/._img0.png")
    put(src, "cat/notes.txt")
    prepare(PrepareConfig(image_folder=str(src), out=str(tmp_path / "out")))
    m = load_manifest(str(tmp_path / "out"))
    assert m.ignored == {"os_debris": 1, "not_an_image": 1}
    assert m.class_names == ["cat", "dog"] and m.num_rows[TRAIN] > 0


def test_split_folder_names_in_any_case_and_jpeg_aliases(tmp_path):
    """"Train/" and "VAL/" are split folders (else they would become two classes holding every
    image), and .jfif/.jpe files (Windows downloads) are JPEGs, not ignored."""
    images(tmp_path, "Train/cat", 4, 1)
    images(tmp_path, "Train/dog", 4, 2)
    images(tmp_path, "VAL/cat", 1, 3)
    images(tmp_path, "VAL/dog", 1, 4)
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), (200, 10, 10)).save(buf, format="JPEG")
    put(tmp_path, "Train/dog/photo.JFIF", buf.getvalue())
    put(tmp_path, "Train/dog/photo2.jpe", buf.getvalue())
    data = ingest_image_folder(str(tmp_path))
    assert data.class_names == ["cat", "dog"] and totals(data) == {"cat": 5, "dog": 7}
    assert len(data.splits[VAL]) == 2 and not data.ignored


def test_manifest_duplicates_are_found_through_path_spelling(tmp_path):
    images(tmp_path, "cat", 3, 1)
    images(tmp_path, "dog", 3, 2)
    rows = [f"cat/img{i}.png,cat" for i in range(3)] + [f"dog/img{i}.png,dog" for i in range(3)]
    rows += ["./cat/img0.png,cat", "dog//img1.png,dog", "cat/../cat/img2.png,cat"]
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    data = ingest_manifest(str(tmp_path / "m.csv"))
    assert totals(data) == {"cat": 3, "dog": 3} and data.ignored == {"duplicate_rows": 3}
