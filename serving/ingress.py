"""Where clients reach the app: Serve's HTTP proxy, or the replicas directly (Serve's *direct ingress*).

Through the proxy a request makes two hops: client -> proxy actor (HTTP) -> replica (a Ray actor
call). With direct ingress (Ray Serve's ``RAY_SERVE_ENABLE_DIRECT_INGRESS``, Ray >= 2.5x) every
ingress replica also runs its own HTTP server on a port Serve allocates (30000-31000 by default) on
the host Serve was started with, and answers there in one hop. The proxy keeps working beside it
and still load-balances over replicas; a direct URL reaches one replica. Measured on the 2-core
development machine for a no-op FastAPI app at concurrency 1: p50 8.9 ms through the proxy, 2.6 ms
direct (see ``benchmarks/serve_latency.py`` for the app's own figures).

The switch is read by the Serve controller and replicas when their processes start, so it has to be
in the environment before Ray starts (:func:`enable_direct_ingress`); on a cluster started elsewhere
it is whatever that cluster was started with, and :func:`replica_urls` finds out.
"""

from __future__ import annotations

import os
import time

DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"


def enable_direct_ingress() -> None:
    """Turn direct ingress on for a Ray cluster this process is about to start (a user's explicit 0 wins)."""
    os.environ.setdefault(DIRECT_INGRESS_ENV, "1")


def replica_urls(app_name: str, proxy_port: int, timeout_s: float = 30.0) -> list[str]:
    """``http://ip:port`` of each running ingress replica of ``app_name`` that serves HTTP itself.

    Empty when the cluster runs without direct ingress (Serve then lists only its proxies, which
    listen on ``proxy_port``). Replicas get their port while they start, so this waits up to
    ``timeout_s`` for at least one. Uses the Serve controller's ``get_target_groups`` (the call
    Serve's own HAProxy integration makes); a Ray without it yields an empty list.
    """
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:  # Serve is not running
        return []
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            groups = ray.get(controller.get_target_groups.remote(app_name), timeout=10)
        except AttributeError:  # pragma: no cover -- a Ray without direct ingress
            return []
        urls = sorted({
            f"http://{target.ip}:{target.port}"
            for group in groups if str(getattr(group.protocol, "value", group.protocol)).upper() == "HTTP"
            for target in group.targets if target.port != proxy_port
        })
        if urls or os.environ.get(DIRECT_INGRESS_ENV, "0") in ("0", "") or time.monotonic() > deadline:
            return urls
        time.sleep(0.2)
