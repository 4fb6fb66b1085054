"""``amad serve``: start (or join) Ray, start Serve on the given host/port, deploy, follow the alias.

The config is validated and the model URI resolved in the registry before Ray starts, so a typo
is one message, not a cluster start-up. With ``--blocking`` (always, when the command started its
own local Ray cluster) the command serves until Ctrl-C / SIGTERM and then shuts Serve and Ray down;
meanwhile it re-reads the alias every ``poll_s`` seconds and, when it moved, redeploys with the new
version in the user config (an in-place ``reconfigure``; see :mod:`serving.app`).
"""

from __future__ import annotations

import os
import signal
import sys
import time

from serving.config import TOKEN_ENV, ServeConfig
from serving.ingress import enable_direct_ingress, replica_urls


SERVE_OBJECT_STORE_BYTES = 100 * 1024 * 1024  # requests are small; the model lives in each replica


def _log(message: str) -> None:
    print(f"amad serve: {message}", flush=True)


def start(cfg: ServeConfig) -> str:
    """Start Serve on ``cfg.host:cfg.port`` in the connected Ray cluster and deploy; returns the version."""
    from ray import serve

    from serving.app import deploy

    serve.start(proxy_location="HeadOnly", http_options={"host": cfg.host, "port": cfg.port})
    return deploy(cfg, os.environ.get(TOKEN_ENV) or None)


def urls(cfg: ServeConfig) -> tuple[str, list[str]]:
    """``(proxy URL, direct replica URLs)`` of the answer route; the list is empty without direct ingress."""
    route = "/v1/answer"
    return f"http://{cfg.host}:{cfg.port}{route}", [base + route for base in replica_urls(cfg.app_name, cfg.port)]


def main(cfg: ServeConfig, *, address: str | None = None, blocking: bool = False, poll_s: float = 30.0) -> int:
    from pipeline.local_cluster import connected
    from serving.model import resolve_version

    _, version, _, _ = resolve_version(cfg.model, cfg.tracking_uri)  # fails clearly before Ray starts
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        if not blocking:
            _log("no --address: the local Ray cluster ends with this command, so it serves until Ctrl-C (as --blocking)")
            blocking = True
        if cfg.direct_ingress:
            enable_direct_ingress()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
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
                while True:
                    time.sleep(poll_s)
                    _, now, _, _ = resolve_version(cfg.model, cfg.tracking_uri)
                    if now != version:
                        from serving.app import deploy

                        version = deploy(cfg, os.environ.get(TOKEN_ENV) or None)
                        _log(f"{cfg.model} moved: now serving v{version} (replicas reconfigured in place)")
            finally:
                if blocking:
                    from ray import serve

                    serve.shutdown()
    except KeyboardInterrupt:
        _log("shutting down")
        return 0
    except RuntimeError as err:
        print(f"amad serve: error: {err}", file=sys.stderr, flush=True)
        return 1
