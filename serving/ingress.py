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

Where a replica listens: on the host of Serve's ``http_options`` (``ReplicaActor`` starts its server
with the controller's ``get_http_config()``, only the port changed), not on its node's IP address,
which is what the controller's target groups report. A replica of ``amad serve --host 127.0.0.1`` on
a machine whose address is 10.0.0.5 answers at 127.0.0.1, and 10.0.0.5 refuses the connection; so a
URL is built from the bind host, and from the node's address only when the host is a wildcard
(0.0.0.0, ::), where every address of the node answers (:func:`url_host`).
"""

from __future__ import annotations

import os
import time

DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"


# Serve holds a stopping direct-ingress replica open at least this long (default 30 s) so that a load
# balancer in front of the replicas can deregister it, even with no request in flight. In front of the
# replicas of a cluster that this command starts there is none: without this, every stop of `amad serve`
# (Ctrl-C, SIGTERM) would take 30 s more. Requests in flight are still waited for.
DRAINING_PERIOD_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def enable_direct_ingress() -> None:
    """Turn direct ingress on for a Ray cluster this process is about to start (a user's explicit 0 wins),
    with no minimum draining period (a user's value wins)."""
    os.environ.setdefault(DIRECT_INGRESS_ENV, "1")
    os.environ.setdefault(DRAINING_PERIOD_ENV, "0")


def url_host(bind_host: str, node_ip: str) -> str:
    """The host part of a URL that reaches a server bound to ``bind_host`` on the node at ``node_ip``.

    The bind host itself, unless it is a wildcard (every address of the node answers: ``node_ip``);
    an IPv6 address in brackets.
    """
    host = node_ip if bind_host in WILDCARD_HOSTS else bind_host
    return f"[{host}]" if ":" in host else host


def target_urls(groups, bind_host: str, proxy_port: int) -> list[str]:
    """``http://host:port`` of every HTTP target in ``groups`` (the controller's target groups) that
    is not a proxy (``proxy_port``), with the host from :func:`url_host`."""
    return sorted({
        f"http://{url_host(bind_host, target.ip)}:{target.port}"
        for group in groups if str(getattr(group.protocol, "value", group.protocol)).upper() == "HTTP"
        for target in group.targets if target.port != proxy_port
    })


def replica_urls(app_name: str, proxy_port: int, timeout_s: float = 30.0) -> list[str]:
    """``http://host:port`` of each running ingress replica of ``app_name`` that serves HTTP itself,
    at the address it listens on (see the module docstring).

    Empty when the cluster runs without direct ingress (Serve then lists only its proxies, which
    listen on ``proxy_port``). Replicas get their port while they start, so this waits up to
    ``timeout_s`` for at least one. Uses the Serve controller's ``get_target_groups`` (the call
    Serve's own HAProxy integration makes) and ``get_http_config`` (the host replicas bind); a Ray
    without them yields an empty list.
    """
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:  # Serve is not running
        return []
    try:
        bind_host = ray.get(controller.get_http_config.remote(), timeout=10).host
    except AttributeError:  # pragma: no cover -- a Ray without direct ingress
        return []
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            groups = ray.get(controller.get_target_groups.remote(app_name), timeout=10)
        except AttributeError:  # pragma: no cover -- a Ray without direct ingress
            return []
        urls = target_urls(groups, bind_host, proxy_port)
        if urls or os.environ.get(DIRECT_INGRESS_ENV, "0") in ("0", "") or time.monotonic() > deadline:
            return urls
        time.sleep(0.2)
