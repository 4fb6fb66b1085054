"""ONNX Runtime's telemetry stays off in every process that runs our code, unless the user turns it on.

ONNX Runtime 1.32's Linux wheels send usage events to Microsoft and, on import, write a device id to
``~/.cache/Microsoft/DeveloperTools/.onnxruntime/`` and an event cache to ``$TMPDIR/.ses`` (found when
the test sandbox flagged a new ``/tmp/.ses``). ``ORT_DISABLE_TELEMETRY=1`` set before onnxruntime
loads stops all of it; ``pipeline`` and ``serving`` set it when imported, unless the user set it.

ONNX Runtime also stays quiet on its own where it detects a CI service (``CI``, ``GITHUB_ACTIONS``, ...:
:data:`CI_MARKERS`, read from the library's strings) -- which is why the control once passed here and
failed in CI. Each case imports in a fresh interpreter (the setting is read once per process) with its
own ``TMPDIR`` and ``HOME`` (no ``XDG_CACHE_HOME``), and without the session's ``ORT_DISABLE_TELEMETRY`` or any CI marker, so
the control holds on every machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EVENT_CACHE = ".ses"  # in $TMPDIR
DEVICE_ID_DIR = Path(".cache", "Microsoft", "DeveloperTools", ".onnxruntime")  # in $HOME
CI_MARKERS = ("CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL", "CODEBUILD_BUILD_ID",
              "BUILDKITE", "TEAMCITY_VERSION", "APPVEYOR", "BITBUCKET_BUILD_NUMBER", "ORT_RUNNING_UNIT_TESTS")


def imports(code: str, tmp_path: Path, **env: str) -> tuple[bool, bool]:
    """Run ``code`` in a fresh interpreter with new ``TMPDIR`` and ``HOME`` directories; whether it left
    (the event cache in TMPDIR, the device id in HOME)."""
    tmpdir, home = tmp_path / "tmpdir", tmp_path / "home"
    tmpdir.mkdir()
    home.mkdir()
    drop = {"ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME", *CI_MARKERS}  # the sandbox moves XDG_CACHE_HOME
    environ = {k: v for k, v in os.environ.items() if k not in drop}
    environ.update(TMPDIR=str(tmpdir), HOME=str(home), **env)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ, check=True, timeout=120)
    return (tmpdir / EVENT_CACHE).exists(), (home / DEVICE_ID_DIR).exists()


def test_onnxruntime_alone_writes_its_event_cache_and_device_id(tmp_path):
    """The control: without the setting, the pinned onnxruntime leaves both (else the tests below prove nothing)."""
    assert imports("import onnxruntime", tmp_path) == (True, True)


def test_a_ci_marker_alone_silences_it(tmp_path):
    """Why the control must drop the markers: with ``CI`` set, onnxruntime writes nothing by itself."""
    assert imports("import onnxruntime", tmp_path, CI="true") == (False, False)


@pytest.mark.parametrize("module", ["pipeline.onnx_tools", "serving.model"])
def test_our_modules_turn_it_off_before_onnxruntime_loads(module, tmp_path):
    assert imports(f"import {module}; import onnxruntime", tmp_path) == (False, False)


def test_a_user_who_turns_it_on_keeps_it_on(tmp_path):
    assert imports("import serving.model; import onnxruntime", tmp_path, ORT_DISABLE_TELEMETRY="0") == (True, True)
