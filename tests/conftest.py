"""Shared fixtures: one local Ray instance for the whole session, tiny imbalanced data."""

from __future__ import annotations

import os

import pytest

# Quieter logs from Ray Data inside Train; set before ray is imported anywhere.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")

# Logical CPUs for the shared instance. 4 on a 2-core machine: Ray Data's read step needs one
# whole free logical CPU next to train workers (see shared notes), and CPU work is time-sliced.
RAY_TEST_CPUS = 4


def pytest_collection_modifyitems(config, items):
    """Test lanes: every test that needs Ray carries the ``ray`` marker, so ``pytest -m "not ray"``
    is a fast lane that never starts Ray. Tests using the shared instance are marked here, from
    their fixtures, rather than by hand; end-to-end (``slow``) tests start Ray in a subprocess."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _no_leaked_ray():
    """A test that starts Ray in this process (a job's ``main`` run in-process) must not leave it
    up: later tests assert that preflight errors come before Ray starts. Session-scoped
    ``ray_session`` is set up before this fixture, so the shared instance is left alone."""
    import ray

    was_up = ray.is_initialized()
    yield
    if not was_up and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def ray_session():
    """Start (once) and yield the shared local Ray instance; shut it down at the end."""
    import ray

    from imgpipe.runtime import start_local_ray

    if not ray.is_initialized():
        from serving.ingress import use_ingress

        use_ingress("haproxy")  # the serving tests run jobs/serve.py's default ingress
        # Pins the State API to this instance (and its workers): jobs the tests start may
        # run a second local instance beside it.
        start_local_ray(num_cpus=RAY_TEST_CPUS, object_store_memory=1_000_000_000,
                        log_to_driver=True, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory) -> str:
    """Real long-tailed digits shards, small enough for seconds-long Ray runs (rho=20)."""
    from imgpipe.config import PrepareConfig
    from imgpipe.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "digits-lt"
    prepare(PrepareConfig(dataset="digits-lt", out=str(out), imbalance_ratio=20, seed=0,
                          val_per_class=6, test_per_class=10, rows_per_shard=64))
    return str(out)


@pytest.fixture(scope="session")
def corrupt_digits(tmp_path_factory) -> tuple[str, int]:
    """Digits shards with two unusable images in train (garbage bytes and a truncated PNG)."""
    from imgpipe.data.datasets import load_digits_lt
    from imgpipe.data.shards import write_shards

    data = load_digits_lt(imbalance_ratio=20, seed=0, val_per_class=6, test_per_class=10)
    train = [dict(r) for r in data.splits["train"]]
    train[0]["image"] = b"definitely not an image"
    train[1]["image"] = train[1]["image"][: len(train[1]["image"]) // 2]
    splits = {**data.splits, "train": train}
    out = tmp_path_factory.mktemp("data") / "digits-corrupt"
    write_shards(str(out), splits, data.class_names,
                 {"source": "digits-lt+corrupt", "seed": 0, "imbalance_ratio": 20, "mode": "L"},
                 rows_per_shard=64)
    return str(out), 2
