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


@pytest.fixture(scope="session")
def ray_session():
    """Start (once) and yield the shared local Ray instance; shut it down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=RAY_TEST_CPUS,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            object_store_memory=1_000_000_000,
            log_to_driver=True,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()
