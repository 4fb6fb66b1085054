"""Grafana dashboards (``amad dashboards``, ``deploy/observability/``) and the service's metric helpers.

The committed dashboards must be what the command writes with the pinned Ray (a Ray upgrade or a new
metric shows up here as a difference), the amad dashboard must chart exactly the metrics the replicas
record (``serving/metrics.py``), and the command's bad input is a clear error. That the metrics are
recorded and exported is an integration test against a real Serve app (``tests/test_serve.py``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import dashboards
from serving import metrics

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "deploy" / "observability"
EXPECTED_FILES = {"ray_default.json", "ray_serve.json", "ray_serve_deployment.json", "ray_train.json", "amad_serve.json"}


@pytest.fixture
def no_grafana_overrides(monkeypatch):
    """Ray's factory reads RAY_GRAFANA_*_DASHBOARD_* variables; the committed files are its defaults."""
    for name in [n for n in os.environ if n.startswith("RAY_GRAFANA_")]:
        monkeypatch.delenv(name)


def test_the_committed_dashboards_are_what_the_command_writes(no_grafana_overrides):
    built = dashboards.dashboards()
    assert set(built) == EXPECTED_FILES
    assert {p.name for p in COMMITTED.glob("*.json")} == EXPECTED_FILES
    stale = [name for name, text in built.items() if (COMMITTED / name).read_text() != text]
    assert not stale, f"deploy/observability/ is out of date for {stale}: run `amad dashboards --out deploy/observability`"


def test_every_dashboard_is_from_the_pinned_ray(no_grafana_overrides):
    ray_pin = re.search(r"^ray==(\S+)", (ROOT / "constraints.txt").read_text(), re.MULTILINE).group(1)
    for name in EXPECTED_FILES:
        dashboard = json.loads((COMMITTED / name).read_text())
        assert f"rayVersion:{ray_pin}" in dashboard["tags"], (name, dashboard["tags"])
        assert dashboard["panels"] and dashboard["uid"], name


def test_the_amad_dashboard_charts_exactly_the_metrics_the_replicas_record():
    dashboard = json.loads((COMMITTED / "amad_serve.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"\b(ray_amad_[a-z_]+?)(?:_total|_bucket|_sum|_count)?\b[{\[]", expr)}
    recorded = {metrics.PREFIX + name for name in (metrics.REQUESTS, metrics.BATCH_SIZE, metrics.INFERENCE_MS, metrics.MODEL_VERSION)}
    assert used == recorded, (used, recorded)
    for expr in exprs:
        assert expr.count("{") == expr.count("}") and "global_filters" not in expr and "{{" not in expr, expr
        assert 'application=~"$Application"' in expr, expr  # the dashboard's variables filter every query
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "Application", "Deployment", "Replica"} <= variables


def test_amad_dashboards_writes_into_a_new_directory_and_refuses_a_file(tmp_path):
    out = tmp_path / "grafana" / "amad"
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "dashboards", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in out.iterdir()} == EXPECTED_FILES
    assert all(json.loads(p.read_text())["panels"] for p in out.iterdir())

    a_file = tmp_path / "not-a-dir"
    a_file.write_text("keep me")
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "dashboards", "--out", str(a_file)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert f"cannot write the dashboards to {a_file}" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert a_file.read_text() == "keep me"


@pytest.mark.parametrize(("status", "label"), [(200, "2xx"), (204, "2xx"), (401, "4xx"), (413, "4xx"), (500, "5xx")])
def test_status_classes(status, label):
    assert metrics.status_class(status) == label


def test_the_version_gauge_takes_registry_versions_and_marks_others():
    assert metrics.version_number("7") == 7.0
    assert metrics.version_number("latest") == -1.0 and metrics.version_number(None) == -1.0


def test_metrics_do_nothing_outside_a_replica():
    off = metrics.ServiceMetrics(enabled=False)
    off.request("/v1/answer", 200)
    off.batch(4, 0.01)
    off.serving("amad-student", "3")
