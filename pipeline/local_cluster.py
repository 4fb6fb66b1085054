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
remaining trials wait for CPUs until the sweep's time budget ends it. A head whose dashboard still
did not start is started again on another port (:func:`add_head`).

Ray's files go under a private directory made where Ray would put them (``$RAY_TMPDIR``, else
``$TMPDIR``, else /tmp: :func:`private_ray_tmpdir`), removed when the cluster ends.

Stopping (SIGTERM from Kubernetes, systemd, ``docker stop``; see :mod:`pipeline.stopping`): a cluster
started here keeps the caller's SIGTERM handler through Ray's start-up, shuts down completely even when
a signal arrives meanwhile, and leaves no process behind (:func:`_shut_down`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
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


# Ports handed out by free_port(): a port nothing listens on now, but not one the kernel may give an
# outgoing connection (its ephemeral range) nor one ``ray start`` gives workers (10002-19999), so that
# nothing else takes it between the check and the bind by Ray or Serve.
PORT_FLOOR = 20000
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DASHBOARD_ATTEMPTS = 3
_handed_out: set[int] = set()  # never the same port twice in one process (two clusters, or a cluster and Serve)


def ephemeral_port_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux default 32768-60999 if unreadable)."""
    try:
        low, high = (int(part) for part in path.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def port_candidates(ephemeral: tuple[int, int] | None = None) -> range:
    """Where :func:`free_port` looks: from ``PORT_FLOOR`` up to the ephemeral range, else above it.

    Empty (``range(0)``) when neither side has 1,000 ports; the OS then picks one (see :func:`free_port`).
    """
    low, high = ephemeral or ephemeral_port_range()
    below, above = range(PORT_FLOOR, low), range(max(high + 1, PORT_FLOOR), 65536)
    best = max(below, above, key=len)
    return best if len(best) >= 1000 else range(0)


def _bindable(port: int) -> bool:
    """Nothing listens on ``port`` on loopback or on any IPv4 interface right now."""
    for host in (LOOPBACK, ""):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                return False
    return True


def free_port() -> int:
    """A TCP port nothing on this machine listens on right now, chosen to stay free until Ray or Serve binds it.

    The probe socket is closed before the caller binds, so the port must be one that nobody else is
    handed in between: it is drawn at random (not from :mod:`random`'s seeded generator: two processes
    seeded alike would draw alike) from :func:`port_candidates`, outside the kernel's ephemeral range
    (outgoing connections and other ``bind(0)`` callers get ports only from that range), and never
    handed out twice by one process. Free means bindable on 127.0.0.1 and on all interfaces.
    """
    candidates = port_candidates()
    for _ in range(200 if candidates else 0):
        port = candidates[secrets.randbelow(len(candidates))]
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:  # no room outside the ephemeral range
        probe.bind((LOOPBACK, 0))
        port = probe.getsockname()[1]
    _handed_out.add(port)
    return port


def add_head(cluster, attempts: int = DASHBOARD_ATTEMPTS, **node_args) -> None:
    """Start the head of ``cluster`` (a ``ray.cluster_utils.Cluster``) with its dashboard on a free port,
    or raise: Ray only logs an error when the dashboard cannot start, and without it a sweep would
    stall later (see the module docstring). A head whose dashboard did not start (its port taken
    after all) is stopped and started again on another port, ``attempts`` times in all."""
    for attempt in range(1, attempts + 1):
        port = free_port()
        cluster.add_node(**node_args, dashboard_port=port)
        if cluster.head_node.address_info.get("webui_url"):
            return
        cluster.remove_node(cluster.head_node, allow_graceful=False)
        print(f"[local cluster] the dashboard did not start on port {port} (attempt {attempt} of {attempts})", file=sys.stderr, flush=True)
    raise RuntimeError(
        f"the local Ray cluster started without its dashboard {attempts} times (its port was taken?); Ray Train needs the "
        "dashboard's State API to release the CPUs of stopped trials. See Ray's error above for the cause."
    )


# Ray puts Unix sockets under its session directory, at most this many bytes below the directory that
# RAY_TMPDIR names: "/ray/session_<date and microseconds>_<pid up to 7 digits>/sockets/dash_TaskEventsHead"
# (the longest socket name in Ray 2.60) is 75; 70 were seen with 5-digit pids. A socket path may have
# 107 bytes (108 with the terminating NUL), so the private directory may have 32.
SOCKET_PATH_LIMIT = 107
RAY_SOCKET_SUFFIX_BYTES = 75
SHORT_PREFIX = "r"
DEFAULT_PARENT = Path("/tmp")


def private_dir_parent(prefix: str = "amad-ray-", environ: MutableMapping[str, str] | None = None) -> tuple[Path, str, str | None]:
    """Where :func:`private_ray_tmpdir` makes its directory: ``(parent, prefix, why /tmp)``.

    The directory Ray itself would use (``ray._common.utils.get_default_system_temp_dir``):
    ``$RAY_TMPDIR`` when set, else ``$TMPDIR``, else /tmp. Ray's socket paths under the private
    directory (``parent/<prefix>XXXXXXXX``, 8 random characters) must stay within the 107-byte limit:
    when ``prefix`` makes it too long the one-letter ``SHORT_PREFIX`` is used, and when even that does
    not fit the parent falls back to /tmp, with the reason as the third value (``None`` otherwise).
    """
    environ = os.environ if environ is None else environ
    variable = next((name for name in ("RAY_TMPDIR", "TMPDIR") if environ.get(name)), None)
    parent = Path(os.path.abspath(environ[variable])) if variable else DEFAULT_PARENT
    room = SOCKET_PATH_LIMIT - RAY_SOCKET_SUFFIX_BYTES - len(os.fsencode(parent)) - 1 - 8  # bytes left for the prefix
    for candidate in (prefix, SHORT_PREFIX):
        if len(os.fsencode(candidate)) <= room:
            return parent, candidate, None
    longest = SOCKET_PATH_LIMIT - RAY_SOCKET_SUFFIX_BYTES - 1 - 8 - len(SHORT_PREFIX)
    why = (f"{variable}={environ[variable]} is {len(os.fsencode(parent))} bytes long: Ray's socket paths under a private "
           f"directory in it would pass the {SOCKET_PATH_LIMIT}-byte Unix limit (keep it to {longest} bytes); "
           f"using {DEFAULT_PARENT} instead")
    return DEFAULT_PARENT, prefix, why


@contextlib.contextmanager
def private_ray_tmpdir(prefix: str = "amad-ray-") -> Iterator[Path]:
    """A fresh ``RAY_TMPDIR`` for the duration (restored and removed after); yields Ray's session root in it.

    Made where Ray would put its files (the ``RAY_TMPDIR`` or ``TMPDIR`` the user set, else /tmp), short
    enough for Ray's socket paths (:func:`private_dir_parent`, which says when a long one makes it fall
    back to /tmp).
    """
    parent, prefix, fallback = private_dir_parent(prefix)
    if fallback and os.environ.get("RAY_TMPDIR"):  # said when the user named a directory for Ray (a long TMPDIR is common)
        print(f"[local cluster] {fallback}", file=sys.stderr, flush=True)
    parent.mkdir(parents=True, exist_ok=True)  # as Ray itself creates the RAY_TMPDIR it is given
    temp_dir = tempfile.mkdtemp(prefix=prefix, dir=parent)
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
def _node_temp_files(session_root: Path) -> Iterator[None]:
    """Ray processes started meanwhile keep their temporary files (``TMPDIR``) in the private directory.

    They are often killed rather than stopped (a cluster's shutdown, ASHA stopping a trial), so what
    they would remove at exit stays: the dashboard's multiprocessing forkserver leaves a ``pymp-*``
    directory in /tmp per cluster, a Train worker killed while writing a checkpoint its
    ``TemporaryDirectory``. Under the private directory, they go with it. Only the node processes
    (and the workers they start) get it: this process's temporary directory is fixed first
    (:mod:`tempfile` keeps the first one it finds) and ``TMPDIR`` is restored once the nodes are up.
    """
    tempfile.gettempdir()
    directory = session_root.parent / "tmp"
    directory.mkdir(exist_ok=True)
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(directory)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous


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
            with _callers_sigterm_handler():
                with _node_temp_files(session_root):
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
            _shut_down(cluster, session_root.parent, disconnect=connect)


@contextlib.contextmanager
def connected(address: str | None = None, object_store_memory: int | None = None, log_to_driver: bool = True) -> Iterator[None]:
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
        with _callers_sigterm_handler():
            ray.init(address=target, log_to_driver=log_to_driver)
        try:
            yield
        finally:
            with _signals_deferred() as reassert:
                ray.shutdown()
                reassert()
        return
    from ray.cluster_utils import Cluster

    global _OWN_CLUSTER
    with private_ray_tmpdir() as session_root:
        cluster = Cluster()
        try:
            options = {"object_store_memory": object_store_memory} if object_store_memory else {}
            with _callers_sigterm_handler():
                with _node_temp_files(session_root):
                    add_head(cluster, num_cpus=os.cpu_count() or 1, temp_dir=str(session_root), **options)
                cluster.wait_for_nodes()
                ray.init(address=cluster.address, log_to_driver=log_to_driver)
            _OWN_CLUSTER = True
            with _started_here(True):
                yield
        finally:
            _OWN_CLUSTER = False
            _shut_down(cluster, session_root.parent, disconnect=True)


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


# ---------------------------------------------------------------- stopping: Ray's signal handlers, leftover processes
#
# Ray 2.60 replaces a driver's SIGTERM handler three times while a cluster starts, and the last one
# kills the driver in the middle of its shutdown:
#
# * ``Cluster.add_node`` -> ``Node(shutdown_at_exit=True)`` -> ``Node._register_shutdown_hooks``
#   (ray/_private/node.py): drain the node, kill its processes, ``sys.exit(1)``;
# * ``ray.init`` (ray/_private/worker.py, "terminate any signal before connecting driver"):
#   ``sys.exit(signum)``; both through ``ray._private.utils.set_sigterm_handler``;
# * the driver's core worker, created by ``ray.init``, installs Abseil's failure-signal handler
#   (ray/_raylet.pyx: ``options.install_failure_signal_handler = not RAY_DISABLE_FAILURE_SIGNAL_HANDLER``;
#   src/ray/core_worker/core_worker_process.cc: ``RayLog::InstallFailureSignalHandler(nullptr,
#   /*call_previous_handler=*/true)``), whose list of "failure" signals includes SIGTERM
#   (absl/debugging/failure_signal_handler.cc, ``failure_signal_data``). On SIGTERM it writes
#   "*** SIGTERM received at time=... ***" and a stack trace, calls ``alarm(3)`` with
#   ``ImmediateAbortSignalHandler`` (SIGABRT) on SIGALRM, then raises the signal to the previous
#   handler -- and never cancels the alarm: three seconds into the graceful shutdown the driver dies
#   of SIGABRT, and whatever Ray had not stopped yet (agents, workers) stays.
#
# So while a cluster starts here the caller's own SIGTERM handler (the CLI's, pipeline.stopping) is
# kept (:func:`_callers_sigterm_handler`), and set again once ``ray.init`` returned, which replaces
# Abseil's at the C level (Abseil stays for SIGSEGV, SIGABRT, ...). A caller with no handler of its
# own (a test, a benchmark) gets Ray's behaviour, unchanged.


@contextlib.contextmanager
def _callers_sigterm_handler() -> Iterator[None]:
    """While Ray starts (nodes, ``ray.init``): Ray's handlers stay out, and a SIGTERM waits for the end.

    Only when the SIGTERM handler in place is a Python function the caller installed (the CLI's) and
    this is the main thread; otherwise Ray does what it always does. Meanwhile a SIGTERM is only noted:
    stopped half-way, a node would not be known to the cluster, and its processes would outlive the
    command. Afterwards the caller's handler is set again -- which also replaces Abseil's at the C
    level -- and a noted SIGTERM is raised again for it, once the cluster can be shut down as a whole.
    """
    handler = signal.getsignal(signal.SIGTERM)
    if not callable(handler) or threading.current_thread() is not threading.main_thread():
        yield
        return
    import ray._private.utils as ray_utils

    noted: list[int] = []
    original = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda _ray_handler: None  # Node's and ray.init's handlers
    signal.signal(signal.SIGTERM, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = original
        signal.signal(signal.SIGTERM, handler)
        if noted:
            signal.alarm(0)  # the 3-s abort Abseil arms when a SIGTERM reached its handler first (see above)
            signal.raise_signal(signal.SIGTERM)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[Callable[[], None]]:
    """Shutting down runs to its end: a SIGTERM or Ctrl-C meanwhile is only noted, and acted on afterwards.

    Yields ``reassert()``, to call after ``ray.shutdown()``: a core worker's shutdown may put SIGTERM
    back to its default action at the C level (Ray's ``RayLog::UninstallSignalAction``). Once done, the
    handlers in place before are restored; a noted SIGTERM is raised again for its handler (whose
    default action ends the process, as SIGTERM would have), a noted Ctrl-C raises KeyboardInterrupt.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    noted: list[int] = []

    def note(signum, frame) -> None:
        noted.append(signum)

    previous = {signum: signal.signal(signum, note) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield lambda: signal.signal(signal.SIGTERM, note)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        if signal.SIGTERM in noted:
            signal.raise_signal(signal.SIGTERM)
        elif noted:
            raise KeyboardInterrupt


LEFTOVER_GRACE_S = 5.0  # what Ray's shutdown left gets this long after a SIGTERM, then SIGKILL


def _shut_down(cluster, temp_dir: Path, disconnect: bool) -> None:
    """Disconnect (``disconnect``), stop every node of ``cluster``, then end what Ray left running.

    Ray's own shutdown (SIGTERM, a second, then SIGKILL per node process) does not reach everything:
    processes started by the raylet (the dashboard and runtime-env agents, workers, Serve's replicas)
    outlive a raylet that was killed -- seen: both agents, hung on their way out and deaf to SIGTERM --
    and the processes of a node whose start a Ctrl-C interrupted are not known to the cluster at all.
    So the processes of this cluster are listed before it stops (:func:`cluster_processes`: by the
    private ``temp_dir`` and, through the raylet, its children), and those still running afterwards
    are stopped (:func:`end_processes`: SIGTERM, ``LEFTOVER_GRACE_S``, SIGKILL) and waited for. A
    SIGTERM or Ctrl-C meanwhile is deferred to the end (:func:`_signals_deferred`).
    """
    import ray

    with _signals_deferred() as reassert:
        ours = cluster_processes(temp_dir)
        if disconnect:
            ray.shutdown()
            reassert()
        cluster.shutdown()
        stopped = end_processes(ours + cluster_processes(temp_dir), LEFTOVER_GRACE_S)
        if stopped:
            print(f"[local cluster] stopped {len(stopped)} process(es) Ray's shutdown left running: {', '.join(sorted(set(stopped)))}",
                  file=sys.stderr, flush=True)


def cluster_processes(temp_dir: Path) -> list:
    """The running processes of the cluster whose files are under ``temp_dir`` (``psutil.Process``).

    Every process started while a cluster runs here inherits ``RAY_TMPDIR=temp_dir``, and the node
    processes name it on their command lines; a worker that renamed itself (``ray::IDLE``) is found
    as a descendant of its raylet. Never this process.
    """
    import psutil  # Ray's own copy (ray/thirdparty_files, on sys.path once ray is imported: it is, a cluster runs)

    needle = str(temp_dir)
    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline", "environ"], ad_value=None):
        environ, cmdline = process.info["environ"] or {}, process.info["cmdline"] or []
        if environ.get("RAY_TMPDIR") == needle or any(needle in part for part in cmdline):
            found[process.pid] = process
    for process in list(found.values()):
        try:
            found.update((child.pid, child) for child in process.children(recursive=True))
        except psutil.Error:
            pass
    found.pop(os.getpid(), None)
    return list(found.values())


def _running(process) -> bool:
    """Not exited (a zombie has exited: it is reaped here when it is this process's child)."""
    import psutil

    try:
        if process.status() != psutil.STATUS_ZOMBIE:
            return process.is_running()
        process.wait(timeout=0)  # reaps a child of ours; a stranger's zombie is its parent's to reap
    except (psutil.Error, ChildProcessError):
        pass
    return False


def end_processes(processes: list, grace_s: float) -> list[str]:
    """End ``processes``: a second to exit by themselves (a raylet's workers do, once it is gone), then
    SIGTERM and up to ``grace_s``, then SIGKILL and a bounded wait. Returns the names of those signalled.
    """
    import psutil

    def wait(left: list, seconds: float) -> list:
        deadline = time.monotonic() + seconds
        left = [process for process in left if _running(process)]
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = [process for process in left if _running(process)]
        return left

    left = wait(list({process.pid: process for process in processes}.values()), 1.0)
    signalled = []
    for signum, seconds in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        for process in left:
            try:
                name = process.name()
                process.send_signal(signum)  # psutil checks the pid still is this process (its start time) first
                if signum == signal.SIGTERM:
                    signalled.append(name)
            except psutil.Error:
                pass
        left = wait(left, seconds)
    return signalled
