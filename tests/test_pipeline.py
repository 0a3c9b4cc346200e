"""The Ray Data stream on the shared local Ray instance: decode once, resample per epoch."""

from __future__ import annotations

import numpy as np
import pytest
import ray

from imgpipe.config import Augment
from imgpipe.constants import LABEL, PIXELS, TRAIN
from imgpipe.data.manifest import load_manifest
from imgpipe.data.pipeline import (
    StreamPlan,
    build_decoded,
    build_train_stream,
    set_epoch,
    start_epoch_clock,
)
from imgpipe.data.rebalance import repeat_counts, sampling_rates
from imgpipe.data.shards import read_split_table

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def decoded(ray_session, tiny_digits):
    manifest = load_manifest(tiny_digits)
    pre = manifest.preprocess(16)
    ds, corrupt = build_decoded(tiny_digits, TRAIN, pre, cache=True)
    return manifest, pre, ds, corrupt


def epoch_labels(stream, clock_name: str, epoch: int) -> np.ndarray:
    set_epoch(clock_name, epoch)
    return np.concatenate([b[LABEL] for b in stream.iter_batches(batch_format="numpy")])


def test_decode_once_counts_rows(decoded):
    manifest, pre, ds, corrupt = decoded
    assert corrupt == 0
    assert ds.count() == manifest.num_rows[TRAIN]
    row = ds.take(1)[0]
    assert row[PIXELS].shape == (16, 16, 1) and row[PIXELS].dtype == np.uint8


@pytest.mark.parametrize("strategy", ["oversample", "sqrt", "undersample"])
def test_epoch_counts_follow_the_plan(decoded, strategy):
    manifest, pre, ds, _ = decoded
    counts = np.asarray(manifest.counts_vector(TRAIN))
    rates = sampling_rates(counts, strategy)
    name, clock = start_epoch_clock()
    try:
        stream = build_train_stream(ds, StreamPlan(tuple(rates), 7, name, None, pre))
        got = np.bincount(epoch_labels(stream, name, 3), minlength=len(counts))
    finally:
        ray.kill(clock)
    # exact: the stream draws what the pure per-row function says for (seed, epoch, id)
    table = read_split_table(manifest_root(decoded), TRAIN)
    from imgpipe.data.rebalance import id_hashes

    labels = table[LABEL].to_numpy()
    want = repeat_counts(labels, id_hashes(table["id"].to_pylist()), rates, 7, 3)
    np.testing.assert_array_equal(got, np.bincount(labels, weights=want, minlength=len(counts)))
    # statistical: within 5 sigma of the plan's expectation (floor(r) + Bernoulli(frac r))
    frac = rates % 1
    sigma = np.sqrt(counts * frac * (1 - frac))
    assert np.all(np.abs(got - counts * rates) <= 5 * sigma + 1)


def manifest_root(decoded) -> str:
    return decoded[0].config["out"]


def test_epoch_in_the_plan_draws_what_the_clock_draws(decoded):
    """A one-rank run puts the epoch in the plan (no clock actor); several ranks read the
    clock: the same (seed, epoch) must give the same rows and the same augmentation."""
    from dataclasses import replace

    manifest, pre, ds, _ = decoded
    rates = sampling_rates(manifest.counts_vector(TRAIN), "oversample")
    plan = StreamPlan(tuple(rates), 3, None, Augment(crop_padding=2, rotation_degrees=10), pre)
    name, clock = start_epoch_clock()
    try:
        set_epoch(name, 4)
        via_clock = rows_by_content(build_train_stream(ds, replace(plan, clock_name=name)))
    finally:
        ray.kill(clock)
    via_plan = rows_by_content(build_train_stream(ds, replace(plan, epoch=4)))
    other_epoch = rows_by_content(build_train_stream(ds, replace(plan, epoch=5)))
    assert via_plan == via_clock
    assert via_plan != other_epoch


def rows_by_content(stream) -> list[tuple[int, bytes]]:
    """The epoch's rows as a sorted multiset (block order depends on task timing)."""
    return sorted((int(label), pixels.tobytes())
                  for b in stream.iter_batches(batch_format="numpy")
                  for label, pixels in zip(b[LABEL], b[PIXELS], strict=True))


def test_each_epoch_redraws_and_same_epoch_repeats(decoded):
    manifest, pre, ds, _ = decoded
    counts = manifest.counts_vector(TRAIN)
    rates = sampling_rates(counts, "sqrt")
    name, clock = start_epoch_clock()
    try:
        stream = build_train_stream(ds, StreamPlan(tuple(rates), 0, name, None, pre))
        e0 = np.bincount(epoch_labels(stream, name, 0), minlength=len(counts))
        e0_again = np.bincount(epoch_labels(stream, name, 0), minlength=len(counts))
        e1 = np.bincount(epoch_labels(stream, name, 1), minlength=len(counts))
    finally:
        ray.kill(clock)
    np.testing.assert_array_equal(e0, e0_again)
    assert not np.array_equal(e0, e1)


def test_minority_copies_get_fresh_augmentation(decoded):
    manifest, pre, ds, _ = decoded
    counts = np.asarray(manifest.counts_vector(TRAIN))
    rates = sampling_rates(counts, "oversample")
    tail = int(np.argmin(counts))
    name, clock = start_epoch_clock()
    try:
        stream = build_train_stream(
            ds, StreamPlan(tuple(rates), 0, name, Augment(crop_padding=2, rotation_degrees=15), pre))
        set_epoch(name, 0)
        tail_pixels = [b[PIXELS][b[LABEL] == tail] for b in stream.iter_batches(batch_format="numpy")]
    finally:
        ray.kill(clock)
    tail_pixels = np.concatenate(tail_pixels)
    assert len(tail_pixels) >= counts.max() - 1
    distinct = len({p.tobytes() for p in tail_pixels})
    # a tail class of counts.min() originals, ~counts.max() copies: most copies must differ
    assert distinct > 0.8 * len(tail_pixels)


def test_corrupt_images_are_skipped_and_counted(ray_session, corrupt_digits):
    root, n_bad = corrupt_digits
    manifest = load_manifest(root)
    ds, corrupt = build_decoded(root, TRAIN, manifest.preprocess(16), cache=True)
    assert corrupt == n_bad
    assert ds.count() == manifest.num_rows[TRAIN] - n_bad


def test_same_seed_same_first_batch(decoded):
    manifest, pre, ds, _ = decoded
    rates = sampling_rates(manifest.counts_vector(TRAIN), "oversample")
    ctx = ray.data.DataContext.get_current()
    old = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    batches = []
    try:
        for _ in range(2):
            name, clock = start_epoch_clock()
            stream = build_train_stream(
                ds, StreamPlan(tuple(rates), 5, name, Augment(rotation_degrees=10), pre))
            set_epoch(name, 2)
            batches.append(next(iter(stream.iter_batches(batch_size=32, batch_format="numpy"))))
            ray.kill(clock)
    finally:
        ctx.execution_options.preserve_order = old
    np.testing.assert_array_equal(batches[0][LABEL], batches[1][LABEL])
    np.testing.assert_array_equal(batches[0][PIXELS], batches[1][PIXELS])
