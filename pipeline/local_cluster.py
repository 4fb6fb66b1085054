"""Loopback-only local Ray clusters, for the tests and the benchmarks.

Call :func:`apply_loopback_env` before anything imports Ray (this module imports Ray only inside
:func:`local_cluster`). It makes every Ray process this process starts -- nodes, workers, a CLI
subprocess that inherits the environment -- bind to 127.0.0.1 and keeps all their traffic on loopback:

* ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Ray 2.60 rewrites a loopback address given to ``ray.init``
  (``address=`` and ``_node_ip_address=``) through ``services.resolve_ip_for_localhost`` ->
  ``get_node_ip_address()``, which returns the machine's interface address while
  ``ray_constants.ENABLE_RAY_CLUSTER`` is true (its Linux default). ``ENABLE_RAY_CLUSTER`` is read from
  this variable when ``ray._private.ray_constants`` is imported; with it false, ``get_node_ip_address()``
  returns 127.0.0.1 (also for ``ray.init(address="local")``, which the CLI uses). It only stops the
  ``ray start`` CLI from joining nodes; ``ray.cluster_utils.Cluster`` does not use that CLI.
* ``GLOO_SOCKET_IFNAME=lo``: Gloo (DDP on CPU) binds its sockets to the address the hostname resolves
  to unless told an interface.
* ``RAY_USAGE_STATS_ENABLED=0`` and dead HTTP(S) proxies: the head's dashboard always (usage stats on
  or off) probes cloud metadata servers over HTTP (169.254.169.254, metadata.google.internal) and,
  with usage stats off on a cluster not started by ``ray.init``, posts a "disabled" notice to
  usage-stats.ray.io. Both use ``requests``, which honours the proxy variables: every non-loopback
  HTTP(S) request goes to a closed loopback port and fails at once; loopback requests (the State API
  on the dashboard) go direct. (Ray's gRPC ignores them: ``grpc.enable_http_proxy=0``.)

Every cluster started here gets its dashboard on a free port (:func:`free_port`), not Ray's fixed
8265: when 8265 is taken (another Ray cluster on the machine, a test's session cluster) Ray starts the
new head without a dashboard and only logs an error; Ray Train's placement-group cleaner then cannot
reach the State API, the placement groups of trials that ASHA stopped are never released, and the
remaining trials wait for CPUs until the sweep's time budget ends it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator, MutableMapping
from pathlib import Path

LOOPBACK = "127.0.0.1"
DEAD_PROXY = f"http://{LOOPBACK}:9"  # nothing listens on the discard port
OBJECT_STORE_BYTES = 80 * 1024 * 1024


def loopback_variables() -> dict[str, str]:
    """The environment variables described in the module docstring."""
    values = {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "GLOO_SOCKET_IFNAME": "lo",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        values[name] = DEAD_PROXY
    for name in ("no_proxy", "NO_PROXY"):
        values[name] = f"{LOOPBACK},localhost,::1"
    return values


def apply_loopback_env(environ: MutableMapping[str, str] | None = None) -> None:
    """Set :func:`loopback_variables` in ``environ`` (default: this process's ``os.environ``).

    For this process it must run before Ray is imported; if Ray's constants are already imported,
    the one that matters is patched as well (``services`` reads it at call time).
    """
    target = os.environ if environ is None else environ
    target.update(loopback_variables())
    if target is os.environ and "ray._private.ray_constants" in sys.modules:
        sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER = False


def free_port() -> int:
    """A TCP port nothing on this machine listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def add_head(cluster, **node_args) -> None:
    """Start the head of ``cluster`` (a ``ray.cluster_utils.Cluster``) with its dashboard on a free port,
    or raise: Ray only logs an error when the dashboard cannot start, and without it a sweep would
    stall later (see the module docstring), so the cluster is refused at once instead."""
    cluster.add_node(**node_args, dashboard_port=free_port())
    if not cluster.head_node.address_info.get("webui_url"):
        raise RuntimeError(
            "the local Ray cluster started without its dashboard (its port was taken?); Ray Train needs the "
            "dashboard's State API to release the CPUs of stopped trials. See Ray's error above for the cause."
        )


@contextlib.contextmanager
def private_ray_tmpdir(prefix: str = "amad-ray-") -> Iterator[Path]:
    """A fresh ``RAY_TMPDIR`` for the duration (restored and removed after); yields Ray's session root in it.

    Short path under /tmp: Ray's socket paths under it must stay below the 107-byte Unix limit.
    """
    temp_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir
    session_root = Path(temp_dir) / "ray"  # = Ray's default temp dir under RAY_TMPDIR
    session_root.mkdir()
    try:
        yield session_root
    finally:
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def local_cluster(
    nodes: int = 2,
    num_cpus: float = 1,
    object_store_memory: int = OBJECT_STORE_BYTES,
    connect: bool = True,
    prefix: str = "amad-ray-",
) -> Iterator:
    """A ``ray.cluster_utils.Cluster`` of ``nodes`` nodes bound to 127.0.0.1 (the first is the head).

    Everything of Ray's goes under a private temporary directory (``RAY_TMPDIR`` for the duration), so
    its ``ray_current_cluster`` address file never makes another process's ``ray.init()`` join it. With
    ``connect`` this process's driver is connected. Always shut down on exit -- only the processes this
    cluster started, never ``ray stop`` -- and ``RAY_TMPDIR`` restored. Call :func:`apply_loopback_env`
    first.
    """
    import ray
    from ray.cluster_utils import Cluster

    node = dict(num_cpus=num_cpus, object_store_memory=object_store_memory, node_ip_address=LOOPBACK)
    with private_ray_tmpdir(prefix) as session_root:
        cluster = Cluster()
        try:
            add_head(cluster, **node, temp_dir=str(session_root))  # with the dashboard: Train V2 queries the State API
            for _ in range(nodes - 1):
                cluster.add_node(**node)
            cluster.wait_for_nodes()
            if not cluster.address.startswith(f"{LOOPBACK}:"):
                raise RuntimeError(f"the local Ray cluster is at {cluster.address}, not on {LOOPBACK}: call apply_loopback_env() before importing ray")
            if connect:
                ray.init(address=cluster.address)
            with _started_here(connect):
                yield cluster
        finally:
            if connect:
                ray.shutdown()
            cluster.shutdown()


@contextlib.contextmanager
def connected(address: str | None = None, object_store_memory: int | None = None) -> Iterator[None]:
    """Connect this process to Ray for a job: the cluster already connected, else ``address`` /
    ``$RAY_ADDRESS``, else a new one-node cluster on this machine (all its CPUs), shut down on exit.

    The new cluster keeps its files under a private ``RAY_TMPDIR`` (as :func:`local_cluster` does), so
    its own processes find it by its ``ray_current_cluster`` file. Plain ``ray.init(address="local")``
    leaves them none: Ray Train's placement-group cleaner then looks the cluster up by scanning for GCS
    processes, fails as soon as another Ray cluster runs on the machine, and the placement groups of
    trials that ASHA stopped are never released -- later trials and Serve replicas wait forever.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target)
        try:
            yield
        finally:
            ray.shutdown()
        return
    from ray.cluster_utils import Cluster

    global _OWN_CLUSTER
    with private_ray_tmpdir() as session_root:
        cluster = Cluster()
        try:
            options = {"object_store_memory": object_store_memory} if object_store_memory else {}
            add_head(cluster, num_cpus=os.cpu_count() or 1, temp_dir=str(session_root), **options)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address)
            _OWN_CLUSTER = True
            with _started_here(True):
                yield
        finally:
            _OWN_CLUSTER = False
            ray.shutdown()
            cluster.shutdown()


_OWN_CLUSTER = False  # True while connected() holds a cluster it started itself
_CONNECTED_LOCAL = 0  # how many local_cluster()/connected() clusters this process started and is connected to


@contextlib.contextmanager
def _started_here(connected_to_it: bool) -> Iterator[None]:
    global _CONNECTED_LOCAL
    _CONNECTED_LOCAL += connected_to_it
    try:
        yield
    finally:
        _CONNECTED_LOCAL -= connected_to_it


def started_here() -> bool:
    """True while this process is connected to a cluster that it started on this machine
    (:func:`local_cluster` or :func:`connected`): every node is then a local process, none of which a
    cloud provider can preempt."""
    return _CONNECTED_LOCAL > 0


def release_placement_groups() -> int:
    """Remove every placement group still held in a cluster :func:`connected` started; returns how many.

    Called between stages when no job should hold any. Ray Train V2 relies on its placement-group
    cleaner actor to free the group of a controller that was killed (ASHA stopping a trial kills
    it); that cleaner finds its cluster through the State API, which fails when the head runs no
    dashboard or another Ray cluster runs on the machine, and the groups then hold their CPUs
    forever. Never touches a cluster this process only joined.
    """
    if not _OWN_CLUSTER:
        return 0
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    removed = 0
    for pg_id, info in placement_group_table().items():
        if info.get("state") in ("CREATED", "PENDING", "RESCHEDULING"):
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
            removed += 1
    return removed
