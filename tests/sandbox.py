"""The test session's sandbox: nothing of the developer's reaches the tests, and the tests leave nothing behind.

Loaded by ``tests/conftest.py`` before anything imports Ray or MLflow (``python -m pytest -p sandbox``
loads it alone, as ``tests/test_sandbox.py`` does for a session of its own).

**In.** Variables that would point a test at state outside the session are removed from the
environment of the session, and so of every process it starts (Ray's nodes and workers, the CLI):
a developer with ``MLFLOW_TRACKING_URI`` set would get test versions registered in a real registry,
``RAY_ADDRESS`` would make jobs join a real cluster. Removed (:data:`OUTSIDE_STATE`):

* every ``MLFLOW_*`` variable: tracking and registry URIs, experiment and run ids, credentials,
  artifact stores; each one points MLflow at something outside the session;
* Ray: where a cluster is (``RAY_ADDRESS``, ``RAY_API_SERVER_ADDRESS``, ``RAY_DASHBOARD_ADDRESS``,
  ``RAY_REDIS_ADDRESS``), which namespace or job a driver joins (``RAY_NAMESPACE``, ``RAY_JOB_ID``,
  ``RAY_JOB_CONFIG_JSON_ENV_VAR``, ``RAY_RUNTIME_ENV_HOOK``, ``RAY_OVERRIDE_JOB_RUNTIME_ENV``), where its
  files are (``RAY_TMPDIR``: another cluster's ``ray_current_cluster`` file lives there), where Train
  and Tune put results (``RAY_STORAGE``, ``RAY_AIR_LOCAL_CACHE_DIR``, ``TUNE_RESULT_DIR``), and how a
  cluster authenticates (``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``RAY_USE_TLS``,
  ``RAY_TLS_*``): a developer's settings would switch the test clusters into token or TLS mode;
* ours: ``AMAD_SERVE_CACHE``, ``AMAD_KERNEL_CACHE`` (caches the developer keeps), ``AMAD_SERVE_TOKEN``;
* Hugging Face cache locations (``HF_HOME``, ``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``,
  ``TRANSFORMERS_CACHE``) and ``HF_TOKEN``: a hub name must not resolve from the developer's cache.

Switches that only choose a code path (``AMAD_NATIVE_KERNELS``, ``AMAD_RETAIN_FREED_MEMORY``,
``AMAD_KERNEL_CFLAGS``, ``TMPDIR``) are kept. Caches that libraries keep in the home directory go to
a session directory, removed at the end (:func:`session_variables`): ``XDG_CACHE_HOME`` (our native
kernels, Hugging Face, matplotlib's font cache), ``MPLCONFIGDIR``, ``TORCHINDUCTOR_CACHE_DIR``;
MLflow's telemetry (an id file in ``~/.config/mlflow`` and a report over the network) and ONNX
Runtime's (a device id in ``$TMPDIR/.ses`` and a report over the network) are turned off.

**Out.** The top level of /tmp (and of the system temp directory, when ``TMPDIR`` moves it), of the
home directory and of ``~/.ray``, ``~/.cache`` and ``~/.config`` are listed when the session starts
and again when it ends, after every fixture is torn down; anything new fails the session, named
(:data:`CHECK_ENV` ``=warn`` only reports, ``=0`` skips the check, e.g. on a machine where other
people write to /tmp during the run). Pytest's own ``pytest-of-<user>`` directory is not counted:
pytest keeps the last three sessions' ``tmp_path`` directories there on purpose, for looking at
failures.
"""

from __future__ import annotations

import getpass
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, MutableMapping
from pathlib import Path

import pytest

OUTSIDE_STATE = (
    "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS", "RAY_REDIS_ADDRESS",
    "RAY_NAMESPACE", "RAY_JOB_ID", "RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_RUNTIME_ENV_HOOK", "RAY_OVERRIDE_JOB_RUNTIME_ENV",
    "RAY_TMPDIR", "RAY_STORAGE", "RAY_AIR_LOCAL_CACHE_DIR", "TUNE_RESULT_DIR",
    "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_USE_TLS",
    "AMAD_SERVE_CACHE", "AMAD_KERNEL_CACHE", "AMAD_SERVE_TOKEN",
    "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_TOKEN",
)
OUTSIDE_STATE_PREFIXES = ("MLFLOW_", "RAY_TLS_")
SET_BY_SESSION = frozenset({"MLFLOW_DISABLE_TELEMETRY"})  # an MLFLOW_* variable the session sets itself
CHECK_ENV = "AMAD_LEAK_CHECK"
DIRS_ENV = "AMAD_LEAK_CHECK_DIRS"  # the watched directories instead (os.pathsep-separated): tests/test_sandbox.py's own sessions
SETTLE_ENV = "AMAD_LEAK_CHECK_SETTLE_S"  # how long new paths may take to go (default 10 s)
SESSION_PREFIX = "amad-tests-"


def outside_state(environ: MutableMapping[str, str]) -> list[str]:
    """The names in ``environ`` that :func:`clear_outside_state` removes."""
    return sorted(name for name in environ
                  if (name in OUTSIDE_STATE or name.startswith(OUTSIDE_STATE_PREFIXES)) and name not in SET_BY_SESSION)


def clear_outside_state(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Remove :data:`OUTSIDE_STATE` (and every ``MLFLOW_*``/``RAY_TLS_*``) from ``environ`` (default
    ``os.environ``); returns the names removed."""
    environ = os.environ if environ is None else environ
    removed = outside_state(environ)
    for name in removed:
        del environ[name]
    return removed


def session_variables(session_dir: Path) -> dict[str, str]:
    """Where library caches go for the session (all under ``session_dir``), and telemetry off."""
    return {
        "XDG_CACHE_HOME": str(session_dir / "cache"),
        "MPLCONFIGDIR": str(session_dir / "matplotlib"),
        "TORCHINDUCTOR_CACHE_DIR": str(session_dir / "torchinductor"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "ORT_DISABLE_TELEMETRY": "1",  # the product sets it too (pipeline/__init__.py); tests/test_telemetry.py checks that
    }


# ---------------------------------------------------------------- what the session leaves behind


def watched_dirs(home: Path | None = None) -> list[Path]:
    """The directories whose top level must be the same after the session: /tmp, the system temp
    directory, the home directory and its ``.ray``, ``.cache`` and ``.config``."""
    if os.environ.get(DIRS_ENV):
        return [Path(d) for d in os.environ[DIRS_ENV].split(os.pathsep)]
    home = Path.home() if home is None else home
    dirs = [Path("/tmp"), Path(tempfile.gettempdir()), home, home / ".ray", home / ".cache", home / ".config"]
    return list(dict.fromkeys(d.resolve() if d.exists() else d for d in dirs))


def listing(dirs: Iterable[Path]) -> set[Path]:
    """The entries directly in each of ``dirs`` (a missing directory counts as itself, once it exists)."""
    found: set[Path] = set()
    for directory in dirs:
        if not directory.is_dir():
            continue
        found.add(directory)
        try:
            found.update(directory.iterdir())
        except OSError:
            pass
    return found


def ignored(user: str | None = None) -> set[str]:
    """Names in /tmp that are not counted: pytest's own base directory for ``tmp_path``."""
    return {f"pytest-of-{user or getpass.getuser()}"}


def leftovers(before: set[Path], after: set[Path], skip: set[str] | None = None) -> list[Path]:
    """What is in ``after`` and was not in ``before``, except the names in ``skip``."""
    skip = ignored() if skip is None else skip
    return sorted(path for path in after - before if path.name not in skip)


def settle(before: set[Path], dirs: list[Path], seconds: float = 10.0) -> list[Path]:
    """:func:`leftovers` once nothing new has gone for a moment: processes a test stopped (Ray's,
    a CLI's) may still be removing their own files."""
    deadline = time.monotonic() + seconds
    new = leftovers(before, listing(dirs))
    while new and time.monotonic() < deadline:
        time.sleep(1.0)
        new = leftovers(before, listing(dirs))
    return new


# ---------------------------------------------------------------- pytest hooks (conftest.py registers this module as a plugin)

_state: dict = {}


def start() -> None:
    """Clear the environment, list the watched directories, then make the session directory."""
    if _state:
        return
    early = [name for name in ("ray", "mlflow") if name in sys.modules]
    if early:  # a plugin or an earlier conftest imported them: they may have read the developer's variables already
        raise pytest.UsageError(f"tests/sandbox.py must run before {' and '.join(early)} is imported")
    _state["removed"] = clear_outside_state()
    _state["dirs"] = watched_dirs()
    _state["before"] = listing(_state["dirs"])
    session_dir = Path(tempfile.mkdtemp(prefix=SESSION_PREFIX))
    _state["session_dir"] = session_dir
    os.environ.update(session_variables(session_dir))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config) -> None:
    start()


def pytest_report_header(config) -> str:
    removed = _state.get("removed") or []
    return f"sandbox: cleared {', '.join(removed) if removed else 'no outside-state variables'}; caches in {_state.get('session_dir')}"


@pytest.hookimpl(trylast=True)  # after the runner's own pytest_sessionfinish has torn down the session fixtures
def pytest_sessionfinish(session, exitstatus) -> None:
    if not _state:
        return
    shutil.rmtree(_state["session_dir"], ignore_errors=True)
    mode = os.environ.get(CHECK_ENV, "fail").strip().lower()
    if mode in ("0", "off", "no", "false"):
        return
    new = settle(_state["before"], _state["dirs"], float(os.environ.get(SETTLE_ENV, "10")))
    _state["leftovers"] = new
    if new and mode != "warn" and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    new = _state.get("leftovers")
    if not new:
        return
    terminalreporter.section("left behind in /tmp or the home directory", red=True)
    for path in new:
        terminalreporter.line(f"  {path}", red=True)
    terminalreporter.line(
        f"{len(new)} new path(s) after the session (listed before it started and after every fixture ended): "
        f"tests and the code they run must leave nothing there (tests/sandbox.py). {CHECK_ENV}=warn only reports.",
        red=True,
    )
