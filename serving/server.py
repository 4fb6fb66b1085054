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


def _log(message: str) -> None:
    print(f"amad serve: {message}", flush=True)


def start(cfg: ServeConfig, address: str | None = None) -> str:
    """Connect to (or start) Ray, start Serve on ``cfg.host:cfg.port`` and deploy; returns the version."""
    import ray
    from ray import serve

    from serving.app import deploy

    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            if cfg.direct_ingress:
                enable_direct_ingress()
            for attempt in (1, 2):
                try:
                    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
                             object_store_memory=100 * 1024 * 1024)
                    break
                except Exception as err:  # noqa: BLE001 -- Ray gives its raylet a fixed 30 s; a loaded machine can miss it
                    ray.shutdown()
                    if attempt == 2:
                        raise RuntimeError(f"could not start a local Ray cluster: {err}") from None
                    _log(f"Ray did not start ({str(err)[:120]}); trying once more")
    serve.start(proxy_location="HeadOnly", http_options={"host": cfg.host, "port": cfg.port})
    return deploy(cfg, os.environ.get(TOKEN_ENV) or None)


def urls(cfg: ServeConfig) -> tuple[str, list[str]]:
    """``(proxy URL, direct replica URLs)`` of the answer route; the list is empty without direct ingress."""
    route = "/v1/answer"
    return f"http://{cfg.host}:{cfg.port}{route}", [base + route for base in replica_urls(cfg.app_name, cfg.port)]


def stop() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def main(cfg: ServeConfig, *, address: str | None = None, blocking: bool = False, poll_s: float = 30.0) -> int:
    from serving.model import resolve_version

    _, version, _, _ = resolve_version(cfg.model, cfg.tracking_uri)  # fails clearly before Ray starts
    address = address or os.environ.get("RAY_ADDRESS")
    if not address and not blocking:
        _log("no --address: the local Ray cluster ends with this command, so it serves until Ctrl-C (as --blocking)")
        blocking = True
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        version = start(cfg, address)
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
    except KeyboardInterrupt:
        _log("shutting down")
        return 0
    except RuntimeError as err:
        print(f"amad serve: error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        if blocking:
            stop()
