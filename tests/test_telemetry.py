"""ONNX Runtime's telemetry stays off in every process that runs our code, unless the user turns it on.

ONNX Runtime 1.32's Linux wheels send usage events to Microsoft and, on import, write a device id to
``$TMPDIR/.ses`` (found when the test sandbox flagged a new ``/tmp/.ses``). ``ORT_DISABLE_TELEMETRY=1``
set before onnxruntime loads stops both; ``pipeline`` and ``serving`` set it when imported, unless the
user set it. Each case imports in a fresh interpreter (the setting is read once per process) with its
own ``TMPDIR`` and without the session's own ``ORT_DISABLE_TELEMETRY``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEVICE_ID_FILE = ".ses"


def imports(code: str, tmp_path: Path, **env: str) -> set[str]:
    """Run ``code`` in a fresh interpreter with ``TMPDIR`` a new directory; the names it left there."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    environ = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    environ.update(TMPDIR=str(tmpdir), **env)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ, check=True, timeout=120)
    return {path.name for path in tmpdir.iterdir()}


def test_onnxruntime_alone_writes_its_device_id_file(tmp_path):
    """The control: without the setting, the pinned onnxruntime leaves the file (else the tests below prove nothing)."""
    assert DEVICE_ID_FILE in imports("import onnxruntime", tmp_path)


@pytest.mark.parametrize("module", ["pipeline.onnx_tools", "serving.model"])
def test_our_modules_turn_it_off_before_onnxruntime_loads(module, tmp_path):
    assert DEVICE_ID_FILE not in imports(f"import {module}; import onnxruntime", tmp_path)


def test_a_user_who_turns_it_on_keeps_it_on(tmp_path):
    assert DEVICE_ID_FILE in imports("import serving.model; import onnxruntime", tmp_path, ORT_DISABLE_TELEMETRY="0")
