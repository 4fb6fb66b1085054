"""``amad serve``: start (or join) Ray, start Serve on the given host/port, deploy, follow the alias.

The config is validated and the model URI resolved in the registry before Ray starts, so a typo
is one message, not a cluster start-up. With ``--blocking`` (always, when the command started its
own local Ray cluster) the command serves until Ctrl-C or SIGTERM (:mod:`pipeline.stopping`);
meanwhile it re-reads the alias every ``poll_s`` seconds and, when it moved, redeploys with the new
version in the user config (an in-place ``reconfigure``; see :mod:`serving.app`).

Stopping (:func:`stop`) is graceful: the application goes first, so its replicas finish the requests
they hold (through the proxy or direct), then Serve's proxy and controller, then the Ray cluster the
command started (:func:`pipeline.local_cluster.connected`), with every process it ran. Exit status 0.
"""

from __future__ import annotations

import os
import sys
import time

from serving.config import TOKEN_ENV, ServeConfig
from serving.ingress import enable_direct_ingress, replica_urls, url_host


SERVE_OBJECT_STORE_BYTES = 100 * 1024 * 1024  # requests are small; the model lives in each replica


def _log(message: str) -> None:
    print(f"amad serve: {message}", flush=True)


def start(cfg: ServeConfig) -> str:
    """Start Serve on ``cfg.host:cfg.port`` in the connected Ray cluster and deploy; returns the version."""
    from ray import serve

    from serving.app import deploy

    serve.start(proxy_location="HeadOnly", http_options={"host": cfg.host, "port": cfg.port})
    return deploy(cfg, os.environ.get(TOKEN_ENV) or None)


def stop(app_name: str) -> None:
    """Serve's graceful shutdown: the application, then Serve itself.

    ``serve.delete`` stops the replicas the way Serve stops them on a redeploy: no new requests,
    those in flight finish (up to the deployment's ``graceful_shutdown_timeout_s``). ``serve.shutdown``
    alone would kill the proxy at once, dropping the requests in flight through it.
    """
    from ray import serve

    try:
        serve.delete(app_name)
    except Exception as err:  # Ray itself going down (its processes were signalled too): still shut Serve down
        _log(f"the application did not stop gracefully ({type(err).__name__}: {err}); shutting Serve down")
    finally:
        serve.shutdown()


def urls(cfg: ServeConfig) -> tuple[str, list[str]]:
    """``(proxy URL, direct replica URLs)`` of the model's route (``/v1/answer``, or ``/v1/caption`` for a
    captioner), at the addresses they listen on (:func:`serving.ingress.url_host`); the list is empty
    without direct ingress."""
    import ray

    from serving.model import resolve_version, route_of

    route = route_of(resolve_version(cfg.model, cfg.tracking_uri)[3])
    host = url_host(cfg.host, ray.util.get_node_ip_address())  # the proxy runs on the head node, this driver's
    return f"http://{host}:{cfg.port}{route}", [base + route for base in replica_urls(cfg.app_name, cfg.port)]


def _follow_alias(cfg: ServeConfig, version: str, poll_s: float) -> None:
    """Re-read the alias every ``poll_s`` seconds and redeploy when it moved; returns only by an exception."""
    from serving.app import deploy
    from serving.model import resolve_version

    while True:
        time.sleep(poll_s)
        _, now, _, _ = resolve_version(cfg.model, cfg.tracking_uri)
        if now != version:
            version = deploy(cfg, os.environ.get(TOKEN_ENV) or None)
            _log(f"{cfg.model} moved: now serving v{version} (replicas reconfigured in place)")


def main(cfg: ServeConfig, *, address: str | None = None, blocking: bool = False, poll_s: float = 30.0) -> int:
    from pipeline.local_cluster import connected
    from pipeline.stopping import sigterm_stops
    from serving.model import resolve_version

    resolve_version(cfg.model, cfg.tracking_uri)  # fails clearly before Ray starts
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        if not blocking:
            _log("no --address: the local Ray cluster ends with this command, so it serves until Ctrl-C (as --blocking)")
            blocking = True
        if cfg.direct_ingress:
            enable_direct_ingress()
    # SIGTERM (Kubernetes, systemd, docker stop) stops it as Ctrl-C does; the CLI has installed this already.
    with sigterm_stops("amad serve"):
        try:
            # The same private local cluster as every other command (never a bare ray.init(), which in Ray
            # 2.60 turns on token auth and writes ~/.ray/auth_token for every later Ray on the machine).
            # log_to_driver=False: replicas' per-request access logs stay in Ray's log files, not this console.
            with connected(address, object_store_memory=SERVE_OBJECT_STORE_BYTES, log_to_driver=False):
                try:
                    version = start(cfg)
                    proxy, direct = urls(cfg)
                    _log(f"serving {cfg.model} (v{version}) at {proxy} (Serve's proxy, load-balanced; docs: /docs)")
                    for url in direct:
                        _log(f"  direct to a replica (lowest latency): {url}")
                    if not blocking:
                        return 0
                    _follow_alias(cfg, version, poll_s)
                except KeyboardInterrupt:
                    _log("stopping: requests in flight finish first, then Serve and Ray shut down")
                    raise
                finally:
                    if blocking:
                        stop(cfg.app_name)
        except KeyboardInterrupt:
            _log("stopped")
            return 0
        except RuntimeError as err:
            print(f"amad serve: error: {err}", file=sys.stderr, flush=True)
            return 1
