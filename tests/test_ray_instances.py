"""Two Ray instances on one machine: each instance's processes find their own State API.

Train V2's placement-group cleaner and Tune call the State API without an address; with a
second instance up, Ray's own lookup fails ("Found multiple active Ray instances"), leaked
placement groups starve Ray Data and the next run hangs. ``start_local_ray`` pins it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imgpipe.logs import QUIET_WORKER_NOTES

REPO = Path(__file__).resolve().parents[1]

# Runs in a fresh process beside the test session's instance: init_ray starts a second one.
SECOND_INSTANCE = """
import json, logging, os, ray
from ray._private.worker import get_dashboard_url
from imgpipe.logs import QUIET_WORKER_NOTES, configure_console
from imgpipe.runtime import LOCAL_INSTANCE_ENV, init_ray

configure_console(verbose=False)
init_ray(num_cpus=1)

@ray.remote(num_cpus=0)
def state_api_from_a_worker():
    from ray.dashboard.utils import get_address_for_submission_client
    from ray.util.state import list_placement_groups

    list_placement_groups()  # what Train's cleaner does; raises when the lookup fails
    return (get_address_for_submission_client(None),
            {k: os.environ.get(k) for k in LOCAL_INSTANCE_ENV},
            [[bool(logging.getLogger(name).filter(logging.makeLogRecord({"msg": m})))
              for m in (prefix + " (abc) is dead.", "Failed to clean up placement group: x")]
             for name, prefix in QUIET_WORKER_NOTES.items()])

seen, worker_env, quiet_notes = ray.get(state_api_from_a_worker.remote())

print(json.dumps({"own": "http://" + get_dashboard_url(),
                  "seen_by_worker": seen, "worker_env": worker_env, "quiet_notes": quiet_notes,
                  # the driver itself keeps no override: an explicit address must still win
                  "driver_env": os.environ.get("RAY_API_SERVER_ADDRESS")}))
ray.shutdown()
"""


@pytest.mark.ray
def test_a_second_local_instance_and_its_workers_use_their_own_state_api(ray_session):
    from ray._private.worker import get_dashboard_url

    session = "http://" + get_dashboard_url()
    from imgpipe.runtime import LOCAL_INSTANCE_ENV

    # a value the user set wins over imgpipe's default for a local instance
    env = {k: v for k, v in os.environ.items() if k not in LOCAL_INSTANCE_ENV}
    env["RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"] = "4"
    proc = subprocess.run([sys.executable, "-c", SECOND_INSTANCE], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["seen_by_worker"] == seen["own"] != session
    assert seen["driver_env"] is None
    # the instance's workers (where Train's controller reads its flags) inherit the defaults
    assert seen["worker_env"] == {**LOCAL_INSTANCE_ENV, "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "4"}
    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # nor does the test session's driver
    # the setup hook ran in the worker: Ray's bookkeeping warnings stay off the console
    # (only the routine note: the same logger's failure warnings still pass)
    assert seen["quiet_notes"] == [[False, True]] * len(QUIET_WORKER_NOTES)
