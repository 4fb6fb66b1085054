"""pipeline.local_cluster: ports that stay free until Ray or Serve binds them, and Ray's files where the user said.

Unit tests need no Ray; the two integration tests start a one-node cluster (a few seconds each).
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import pytest

from pipeline import local_cluster
from pipeline.local_cluster import (
    RAY_SOCKET_SUFFIX_BYTES, SOCKET_PATH_LIMIT, ephemeral_port_range, free_port, port_candidates, private_dir_parent, private_ray_tmpdir,
)


@pytest.fixture
def short_dir():
    """A directory with a short path, as Ray's socket paths need (tmp_path is too long): removed after."""
    path = Path(tempfile.mkdtemp(prefix="amad-lc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- free_port


def test_free_ports_are_outside_the_ephemeral_range_distinct_and_bindable_everywhere():
    low, high = ephemeral_port_range()
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50, "one process is never handed the same port twice"
    for port in ports:
        assert port in port_candidates() and not low <= port <= high and port >= local_cluster.PORT_FLOOR, port
    for port in ports[:5]:  # nothing listens there: Serve's (127.0.0.1) and an all-interfaces bind both work
        for host in ("127.0.0.1", ""):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
                server.bind((host, port))
                server.listen()


def test_a_port_something_listens_on_is_not_free():
    for host in ("127.0.0.1", ""):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
            taken.bind((host, free_port()))
            taken.listen()
            assert not local_cluster._bindable(taken.getsockname()[1]), host


def test_the_candidates_avoid_the_ephemeral_range_and_rays_worker_ports():
    assert port_candidates((32768, 60999)) == range(20000, 32768)  # Linux's default range
    assert port_candidates((49152, 65535)) == range(20000, 49152)  # the IANA range some systems use
    assert port_candidates((10000, 20500)) == range(20501, 65536)  # a low range: above it instead
    assert port_candidates((1024, 65535)) == range(0)  # no room: free_port lets the OS pick


def test_the_ephemeral_range_is_read_from_the_kernel(tmp_path):
    (tmp_path / "range").write_text("40000\t50000\n")
    assert ephemeral_port_range(tmp_path / "range") == (40000, 50000)
    assert ephemeral_port_range(tmp_path / "missing") == (32768, 60999)


def test_with_no_room_outside_the_ephemeral_range_the_os_picks(monkeypatch):
    monkeypatch.setattr(local_cluster, "port_candidates", lambda: range(0))
    port = free_port()
    assert 1024 <= port <= 65535 and local_cluster._bindable(port)


# ---------------------------------------------------------------- private_ray_tmpdir


def _fits(parent: Path, prefix: str) -> bool:
    return len(os.fsencode(parent / (prefix + "x" * 8))) + RAY_SOCKET_SUFFIX_BYTES <= SOCKET_PATH_LIMIT


def test_the_private_directory_goes_where_ray_would_put_its_files_if_the_socket_paths_fit(monkeypatch):
    assert private_dir_parent("amad-ray-", {}) == (Path("/tmp"), "amad-ray-", None)
    assert private_dir_parent("amad-ray-", {"TMPDIR": "/var/tmp"}) == (Path("/var/tmp"), "amad-ray-", None)
    assert private_dir_parent("amad-ray-", {"RAY_TMPDIR": "/scratch", "TMPDIR": "/var/tmp"}) == (Path("/scratch"), "amad-ray-", None)
    # a longer directory: the one-letter prefix, as long as the paths fit
    longest = "/" + "d" * (SOCKET_PATH_LIMIT - RAY_SOCKET_SUFFIX_BYTES - 1 - 8 - 1 - 1)
    assert private_dir_parent("amad-ray-", {"RAY_TMPDIR": longest}) == (Path(longest), "r", None)
    for parent, prefix, _ in (private_dir_parent("amad-ray-", {"RAY_TMPDIR": d}) for d in ("/tmp", "/scratch/r", longest)):
        assert _fits(parent, prefix), (parent, prefix)
    # too long even so: /tmp, saying why
    parent, prefix, why = private_dir_parent("amad-ray-", {"RAY_TMPDIR": longest + "d"})
    assert (parent, prefix) == (Path("/tmp"), "amad-ray-") and "RAY_TMPDIR=" in why and "107-byte" in why and "using /tmp" in why
    # a relative RAY_TMPDIR is taken from the working directory (a short one here: a clone's own path
    # can be too long for the socket paths, which would send it to /tmp)
    monkeypatch.chdir("/")
    assert private_dir_parent("amad-ray-", {"RAY_TMPDIR": "relative"}) == (Path("/relative"), "amad-ray-", None)


def test_private_ray_tmpdir_goes_under_the_users_ray_tmpdir_and_leaves_nothing(short_dir, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(short_dir))
    with private_ray_tmpdir() as session_root:
        private = session_root.parent
        assert private.parent == short_dir and session_root.is_dir() and os.environ["RAY_TMPDIR"] == str(private)
        assert _fits(short_dir, private.name[:-8])
    assert os.environ["RAY_TMPDIR"] == str(short_dir)
    assert list(short_dir.iterdir()) == []


def test_a_ray_tmpdir_too_long_for_the_sockets_falls_back_to_tmp_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # pytest's tmp_path: far too long
    with private_ray_tmpdir() as session_root:
        assert session_root.parent.parent == Path("/tmp")
    assert "using /tmp instead" in capsys.readouterr().err and not list(tmp_path.iterdir())


# ---------------------------------------------------------------- with Ray


def _socket_paths(root: Path) -> list[str]:
    found = []
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            with_mode = os.lstat(path)
            if stat.S_ISSOCK(with_mode.st_mode):
                found.append(path)
    return found


@pytest.mark.integration
def test_a_cluster_keeps_its_files_under_the_users_ray_tmpdir(short_dir, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(short_dir))
    with local_cluster.local_cluster(nodes=1, num_cpus=1, connect=False):
        sockets = _socket_paths(short_dir)
        assert sockets, "Ray's sockets are under RAY_TMPDIR"
        assert max(len(os.fsencode(path)) for path in sockets) <= SOCKET_PATH_LIMIT
    assert list(short_dir.iterdir()) == [], "and gone once the cluster is"


@pytest.mark.integration
def test_a_head_whose_dashboard_port_was_taken_is_started_again_on_another(monkeypatch):
    """The race free_port() narrows but cannot close: something binds the port before Ray's dashboard does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        handed = iter([taken.getsockname()[1]])
        real = local_cluster.free_port
        monkeypatch.setattr(local_cluster, "free_port", lambda: next(handed, None) or real())
        with local_cluster.local_cluster(nodes=1, num_cpus=1, connect=False) as cluster:
            url = cluster.head_node.address_info["webui_url"]
            assert url and not url.endswith(f":{taken.getsockname()[1]}"), url
