"""Shared fixtures: a two-node local Ray cluster and a tiny saved teacher.

The cluster keeps everything of its own under a private temporary directory (``RAY_TMPDIR``), so
its ``ray_current_cluster`` address file never makes another process's ``ray.init()`` join it, and
it is always shut down (only the processes it started; never ``ray stop``).

Loopback only: test clusters bind to 127.0.0.1 and no test traffic may leave it (traffic to this
machine's own interface address is flagged too). The environment below is set before anything
imports Ray, and every process a test starts (Ray's nodes and workers, the CLI) inherits it.
"""

from __future__ import annotations

import os
import sys

LOOPBACK = "127.0.0.1"
# Ray 2.60 rewrites a loopback address given to ray.init (address= and _node_ip_address=) through
# services.resolve_ip_for_localhost -> get_node_ip_address(), which returns the machine's interface
# address while ray_constants.ENABLE_RAY_CLUSTER is true (its Linux default). ENABLE_RAY_CLUSTER is
# read from this variable when ray._private.ray_constants is imported; with it false,
# get_node_ip_address() returns 127.0.0.1 (also for `ray.init(address="local")`, which the CLI uses).
# It only stops the `ray start` CLI from joining nodes; ray.cluster_utils.Cluster does not use that CLI.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# Gloo (DDP on CPU) binds its sockets to the address the hostname resolves to unless told an interface.
os.environ["GLOO_SOCKET_IFNAME"] = "lo"
# The head's dashboard always (usage stats on or off) probes cloud metadata servers over HTTP
# (169.254.169.254, metadata.google.internal) and, with usage stats off on a cluster not started by
# ray.init, posts a "disabled" notice to usage-stats.ray.io. Both use `requests`, which honours these:
# every non-loopback HTTP(S) request goes to a closed loopback port and fails at once; loopback
# requests (the State API on the dashboard) go direct. (Ray's gRPC ignores them: grpc.enable_http_proxy=0.)
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
DEAD_PROXY = f"http://{LOOPBACK}:9"  # nothing listens on the discard port
for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
    os.environ[name] = DEAD_PROXY
for name in ("no_proxy", "NO_PROXY"):
    os.environ[name] = f"{LOOPBACK},localhost,::1"
if "ray._private.ray_constants" in sys.modules:  # a plugin imported Ray first: the variable came too late
    sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER = False  # read at call time by services

import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_TEACHER_CONFIG = ROOT / "tune_configs" / "tiny" / "teacher.yaml"
OBJECT_STORE_BYTES = 80 * 1024 * 1024


@pytest.fixture(scope="session")
def ray_cluster():
    """A head and a worker node, 1 CPU and an 80 MB object store each; the driver is connected."""
    import ray
    from ray.cluster_utils import Cluster

    # Short path: Ray's socket paths under it must stay below the 107-byte Unix limit.
    temp_dir = tempfile.mkdtemp(prefix="amad-ray-", dir="/tmp")
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir
    session_root = Path(temp_dir) / "ray"  # = Ray's default temp dir under RAY_TMPDIR
    session_root.mkdir()
    node = dict(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES, node_ip_address=LOOPBACK)
    cluster = Cluster()
    try:
        cluster.add_node(**node, temp_dir=str(session_root))  # the head (with the dashboard: Train V2 queries the State API)
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        assert cluster.address.startswith(f"{LOOPBACK}:"), cluster.address
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if previous is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = previous
        shutil.rmtree(temp_dir, ignore_errors=True)


def save_tiny_teacher(directory: Path, seed: int = 0) -> Path:
    """A randomly initialised teacher of ``tune_configs/tiny/teacher.yaml``'s shape, saved as `amad teacher` saves one.

    Distillation tests need a teacher directory, not a good teacher: this takes a second, training one ~20 s.
    """
    from amad.data.benchmark import benchmark_tokenizer, make_split
    from amad.data.text import save_tokenizer
    from amad.models import ViltAdapter
    from amad.training import evaluate
    from pipeline import train_teacher
    from pipeline.config import TeacherJobConfig, load_config

    cfg = load_config(TINY_TEACHER_CONFIG, TeacherJobConfig)
    spec = cfg.data.benchmark_spec()
    tokenizer = benchmark_tokenizer()
    test = make_split(spec, "test", tokenizer)
    model = train_teacher.build_model(cfg, test.answers, tokenizer.get_vocab_size(), seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    (directory / train_teacher.BENCHMARK_FILE).write_text(json.dumps(spec.to_dict(), indent=2))
    metrics = {"test": {"teacher": evaluate(model, ViltAdapter, test)}, "note": "randomly initialised test fixture"}
    (directory / train_teacher.METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return directory


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A saved (untrained) tiny teacher directory: config.json, model.safetensors, tokenizer, benchmark, metrics."""
    return save_tiny_teacher(tmp_path_factory.mktemp("tiny-teacher"))
