"""Embedded datasets: the long-tail rule, digits-LT splits, synthetic shapes-LT."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from imgpipe.constants import ID, IMAGE, LABEL, LABEL_NAME, SPLITS, TEST, TRAIN, VAL
from imgpipe.data.datasets import (
    MAX_SHAPE_CLASSES,
    load_digits_lt,
    load_shapes_lt,
    long_tail_counts,
    shape_class,
    shape_class_names,
)


def _counts(records: list[dict], num_classes: int) -> list[int]:
    return np.bincount([r[LABEL] for r in records], minlength=num_classes).tolist()


@pytest.mark.parametrize(("n_max", "c", "rho", "expected"), [
    # int(100 * 100 ** (-i / 9)): 100, 59.9, 35.9, 21.5, 12.9, 7.7, 4.6, 2.7, 1.6, 1.0
    (100, 10, 100, [100, 59, 35, 21, 12, 7, 4, 2, 1, 1]),
    # CIFAR-10-LT (Cao et al. 2019) at rho = 100
    (5000, 10, 100, [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]),
    (5000, 10, 10, [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500]),
    (10, 3, 1, [10, 10, 10]),
    (7, 1, 50, [7]),
    # n_max / rho < 1: the tail is clamped to one image, never zero
    (10, 3, 1000, [10, 1, 1]),
])
def test_long_tail_counts_exact(n_max: int, c: int, rho: float, expected: list[int]) -> None:
    assert long_tail_counts(n_max, c, rho) == expected


def test_long_tail_counts_monotone_and_ratio() -> None:
    counts = long_tail_counts(500, 100, 100)
    assert counts[0] == 500 and counts[-1] == 5
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))


@pytest.mark.parametrize(("args", "name"), [
    ((0, 10, 10), "n_max"),
    ((10, 0, 10), "num_classes"),
    ((10, 10, 0.5), "imbalance_ratio"),
    ((10, 10, float("nan")), "imbalance_ratio"),
    ((10, 10, float("inf")), "imbalance_ratio"),
])
def test_long_tail_counts_rejects_bad_input(args: tuple, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        long_tail_counts(*args)


@pytest.fixture(scope="module")
def digits():
    return load_digits_lt(imbalance_ratio=100, seed=0, val_per_class=20, test_per_class=50)


def test_digits_lt_counts_and_balance(digits) -> None:
    assert digits.class_names == [str(i) for i in range(10)]
    assert digits.mode == "L"
    assert _counts(digits.splits[VAL], 10) == [20] * 10
    assert _counts(digits.splits[TEST], 10) == [50] * 10
    # smallest class (8) has 174 images → n_max = 174 - 70 = 104
    assert _counts(digits.splits[TRAIN], 10) == long_tail_counts(104, 10, 100)


def test_digits_lt_splits_disjoint_and_ids(digits) -> None:
    ids = {s: [r[ID] for r in digits.splits[s]] for s in SPLITS}
    all_ids = [i for s in SPLITS for i in ids[s]]
    assert len(all_ids) == len(set(all_ids))
    # the id carries the index into load_digits(): no source image is in two splits
    index = {s: {int(i.removeprefix("digits-")) for i in ids[s]} for s in SPLITS}
    assert not (index[TRAIN] & index[VAL] or index[TRAIN] & index[TEST] or index[VAL] & index[TEST])


def test_digits_lt_records_are_real_images(digits) -> None:
    from sklearn.datasets import load_digits

    source = load_digits()
    rec = digits.splits[TRAIN][0]
    assert set(rec) == {IMAGE, LABEL, LABEL_NAME, ID}
    img = Image.open(io.BytesIO(rec[IMAGE]))
    assert img.format == "PNG" and img.mode == "L" and img.size == (8, 8)
    idx = int(rec[ID].removeprefix("digits-"))
    expected = np.round(source.images[idx] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(img), expected)
    assert rec[LABEL] == source.target[idx] and rec[LABEL_NAME] == str(source.target[idx])


def test_digits_lt_seeded(digits) -> None:
    again = load_digits_lt(imbalance_ratio=100, seed=0)
    other = load_digits_lt(imbalance_ratio=100, seed=1)
    for s in SPLITS:
        assert [r[ID] for r in again.splits[s]] == [r[ID] for r in digits.splits[s]]
    assert {r[ID] for r in other.splits[TEST]} != {r[ID] for r in digits.splits[TEST]}
    assert {r[ID] for r in other.splits[TRAIN]} != {r[ID] for r in digits.splits[TRAIN]}


def test_digits_lt_no_ratio_keeps_pool() -> None:
    data = load_digits_lt(imbalance_ratio=None, seed=0, val_per_class=10, test_per_class=10)
    assert sum(_counts(data.splits[TRAIN], 10)) == 1797 - 200


def test_digits_lt_quota_too_large() -> None:
    with pytest.raises(ValueError, match="test_per_class"):
        load_digits_lt(val_per_class=100, test_per_class=100)


def test_shape_classes_unique_up_to_max() -> None:
    names = shape_class_names(MAX_SHAPE_CLASSES)
    assert len(set(names)) == MAX_SHAPE_CLASSES
    # neighbours differ in both shape and colour
    (s0, c0, _), (s1, c1, _) = shape_class(0), shape_class(1)
    assert s0 != s1 and c0 != c1
    with pytest.raises(ValueError):
        shape_class(MAX_SHAPE_CLASSES)


@pytest.mark.parametrize("num_classes", [3, 25])
def test_shapes_lt(num_classes: int) -> None:
    data = load_shapes_lt(num_classes=num_classes, images_per_class=20, imbalance_ratio=10,
                          image_size=16, seed=3, val_per_class=2, test_per_class=3)
    assert len(data.class_names) == num_classes and data.mode == "RGB"
    assert _counts(data.splits[TRAIN], num_classes) == long_tail_counts(20, num_classes, 10)
    assert _counts(data.splits[VAL], num_classes) == [2] * num_classes
    assert _counts(data.splits[TEST], num_classes) == [3] * num_classes
    ids = [r[ID] for s in SPLITS for r in data.splits[s]]
    assert len(ids) == len(set(ids))
    img = Image.open(io.BytesIO(data.splits[TRAIN][0][IMAGE]))
    assert img.mode == "RGB" and img.size == (16, 16)
    images = Counter(r[IMAGE] for s in SPLITS for r in data.splits[s])
    assert images.most_common(1)[0][1] == 1  # random position/size/noise: no two alike


def test_shapes_lt_seeded_and_stable() -> None:
    kw = {"images_per_class": 4, "image_size": 12, "val_per_class": 1, "test_per_class": 1}
    a = load_shapes_lt(num_classes=3, seed=0, **kw)
    b = load_shapes_lt(num_classes=3, seed=0, **kw)
    c = load_shapes_lt(num_classes=3, seed=1, **kw)
    more = load_shapes_lt(num_classes=4, seed=0, **kw)
    assert [r[IMAGE] for r in a.splits[TEST]] == [r[IMAGE] for r in b.splits[TEST]]
    assert [r[IMAGE] for r in a.splits[TEST]] != [r[IMAGE] for r in c.splits[TEST]]
    # an image depends on (seed, split, class, index) only, not on how many classes there are
    assert a.splits[VAL][0][IMAGE] == more.splits[VAL][0][IMAGE]


def test_shapes_lt_colour_is_the_class_colour() -> None:
    data = load_shapes_lt(num_classes=2, images_per_class=2, imbalance_ratio=1, image_size=32,
                          val_per_class=1, test_per_class=1)
    # class 0 is red, class 1 orange; the brightest pixels carry the foreground colour
    for rec in data.splits[TRAIN]:
        px = np.asarray(Image.open(io.BytesIO(rec[IMAGE]))).reshape(-1, 3).astype(int)
        fg = px[px.sum(axis=1).argsort()[-20:]].mean(axis=0)
        assert fg[0] > 180  # both red and orange have a strong red channel
        assert (fg[1] < 90) == (rec[LABEL] == 0)
