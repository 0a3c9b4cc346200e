"""Bearer-token check and the loud warning for exposed, unauthenticated servers."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os

from pydantic import SecretStr

from serving.schemas import TOKEN_ENV

log = logging.getLogger(__name__)

# Probes must work without credentials (Kubernetes liveness/readiness, load balancers).
PUBLIC_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


def resolve_token(configured: SecretStr | None) -> SecretStr | None:
    """The configured token, else ``$IMGPIPE_SERVE_TOKEN``, else None (auth off)."""
    if configured is not None and configured.get_secret_value():
        return configured
    env = os.environ.get(TOKEN_ENV, "")
    return SecretStr(env) if env else None


def authorized(authorization: str | None, token: SecretStr | None) -> bool:
    """True when auth is off or the header is ``Bearer <token>`` (constant-time compare)."""
    if token is None:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    return hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode())


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and ``localhost``; anything else (0.0.0.0, a LAN IP, a name) is not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str | None, token: SecretStr | None) -> bool:
    """Log a loud warning when binding beyond loopback without a token; True if warned."""
    if host is None or is_loopback(host) or token is not None:
        return False
    bar = "!" * 78
    log.warning(
        "\n%s\nimgpipe serving is bound to %s WITHOUT a bearer token: anyone who can reach "
        "this address can query the model.\nSet args.token or $%s, or bind to 127.0.0.1.\n%s",
        bar, host, TOKEN_ENV, bar,
    )
    return True
