"""The test session's sandbox (tests/sandbox.py): no developer state in, nothing left behind.

Each promise is checked in a pytest session of its own, started here with a hostile environment or a
test that leaves files behind, so that the check that matters (the session's own start and end) runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import sandbox

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

# What a developer with a real registry and a real cluster may have set (none of it reachable here).
DEVELOPER = {
    "MLFLOW_TRACKING_URI": "http://127.0.0.1:9/developer-registry",
    "MLFLOW_REGISTRY_URI": "http://127.0.0.1:9/developer-registry",
    "MLFLOW_EXPERIMENT_ID": "7",
    "MLFLOW_RUN_ID": "0123456789abcdef",
    "RAY_ADDRESS": "127.0.0.1:9",
    "RAY_NAMESPACE": "developer",
    "RAY_TMPDIR": "/nonexistent/developer-ray",
    "RAY_AUTH_MODE": "token",
    "AMAD_SERVE_CACHE": "/nonexistent/developer-cache",
}

CHILD = """
import json, os, sys
sys.stdout.write(json.dumps(sorted(os.environ)))
"""


def _session(args: list[str], env: dict, cwd: Path, basetemp: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """A pytest session of its own (its tmp_path under ``basetemp``, not beside this session's)."""
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--basetemp={basetemp}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_session_sees_no_outside_state_and_neither_do_the_processes_it_starts():
    """Runs in every session: with the variables set outside, in the session started below.

    While the session's own Ray cluster (``ray_cluster``, started by an earlier test) is up, RAY_TMPDIR
    is that cluster's private directory, set by this process: not outside state."""
    from pipeline import local_cluster

    own = {"RAY_TMPDIR"} if local_cluster.started_here() else set()
    outside = [name for name in sandbox.outside_state(os.environ) if name not in own]
    assert outside == [] and not (set(DEVELOPER) - own) & set(os.environ)
    assert os.environ.get("RAY_TMPDIR") != DEVELOPER["RAY_TMPDIR"]
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert Path(os.environ["XDG_CACHE_HOME"]).parent.name.startswith(sandbox.SESSION_PREFIX)
    child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True)
    names = json.loads(child.stdout)
    assert [n for n in sandbox.outside_state(dict.fromkeys(names, "")) if n not in own] == [] and not (set(DEVELOPER) - own) & set(names)
    assert "XDG_CACHE_HOME" in names and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in names  # the rest of the environment is inherited

    from pipeline.tracking import resolve_tracking_uri

    assert resolve_tracking_uri("work") == f"sqlite:///{(Path('work').resolve() / 'mlflow.db').as_posix()}"


def test_a_developers_registry_and_cluster_do_not_reach_a_session(tmp_path):
    """The test above, in a session started with a developer's MLflow and Ray variables set (through the real conftest)."""
    env = {**os.environ, **DEVELOPER, "MLFLOW_TRACKING_USERNAME": "developer", sandbox.CHECK_ENV: "0"}  # the leak check: below
    done = _session([f"{TESTS / 'test_sandbox.py'}::test_the_session_sees_no_outside_state_and_neither_do_the_processes_it_starts", "-q"],
                    env, ROOT, tmp_path / "basetemp")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 passed" in done.stdout


def test_clear_outside_state_removes_what_points_outside_and_keeps_switches():
    environ = {**DEVELOPER, "MLFLOW_S3_ENDPOINT_URL": "http://x", "RAY_TLS_CA_CERT": "/ca", "AMAD_NATIVE_KERNELS": "0",
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TMPDIR": "/var/tmp", "PATH": "/bin"}
    removed = sandbox.clear_outside_state(environ)
    assert removed == sorted([*DEVELOPER, "MLFLOW_S3_ENDPOINT_URL", "RAY_TLS_CA_CERT"])
    assert environ == {"AMAD_NATIVE_KERNELS": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "TMPDIR": "/var/tmp", "PATH": "/bin"}


LEAKY = """
import os
from pathlib import Path

def test_leaves_files_behind():
    if os.environ.get("LEAK") == "1":
        (Path.home() / ".leaky").write_text("x")
        (Path(os.environ["WATCHED_TMP"]) / "amad-leftover").mkdir()
    made = Path(os.environ["WATCHED_TMP"]) / "removed-again"
    made.mkdir()
    made.rmdir()
"""


def test_a_session_that_leaves_files_in_home_or_tmp_fails_and_names_them(tmp_path):
    home, watched_tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    watched_tmp.mkdir()
    (tmp_path / "test_leaky.py").write_text(LEAKY)
    env = {**os.environ, "HOME": str(home), "WATCHED_TMP": str(watched_tmp), "PYTHONPATH": str(TESTS),
           sandbox.DIRS_ENV: os.pathsep.join([str(watched_tmp), str(home), str(home / ".ray")]), sandbox.SETTLE_ENV: "1"}
    env.pop(sandbox.CHECK_ENV, None)
    args = ["-p", "sandbox", "test_leaky.py", "-q"]

    clean = _session(args, env, tmp_path, tmp_path / "basetemp", timeout=120)
    assert clean.returncode == 0, clean.stdout[-3000:] + clean.stderr[-3000:]
    assert "left behind" not in clean.stdout

    leaky = _session(args, {**env, "LEAK": "1"}, tmp_path, tmp_path / "basetemp", timeout=120)
    assert leaky.returncode == 1, leaky.stdout[-3000:] + leaky.stderr[-3000:]
    assert "1 passed" in leaky.stdout and "left behind in /tmp or the home directory" in leaky.stdout
    assert str(home / ".leaky") in leaky.stdout and str(watched_tmp / "amad-leftover") in leaky.stdout
    assert "removed-again" not in leaky.stdout

    (home / ".leaky").unlink()
    (watched_tmp / "amad-leftover").rmdir()
    warned = _session(args, {**env, "LEAK": "1", sandbox.CHECK_ENV: "warn"}, tmp_path, tmp_path / "basetemp", timeout=120)
    assert warned.returncode == 0 and str(home / ".leaky") in warned.stdout, warned.stdout[-3000:]


def test_pytests_own_base_directory_is_not_counted_but_a_new_directory_beside_it_is(tmp_path):
    before = sandbox.listing([tmp_path])
    (tmp_path / "pytest-of-someone").mkdir()
    (tmp_path / "ray").mkdir()
    after = sandbox.listing([tmp_path])
    assert sandbox.leftovers(before, after, sandbox.ignored("someone")) == [tmp_path / "ray"]
    assert sandbox.ignored("someone") == {"pytest-of-someone"}
