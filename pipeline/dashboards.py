"""Grafana dashboards for a cluster running amad: Ray's own, and one for the service's metrics.

``amad dashboards --out deploy/observability`` writes them (the committed copies are that command's
output, and a test regenerates them and compares):

* ``ray_serve.json``, ``ray_serve_deployment.json``, ``ray_train.json``, ``ray_default.json``: Ray's
  dashboards for Serve, Serve deployments, Train and the cluster, from Ray's own dashboard factory
  (``ray.dashboard.modules.metrics.grafana_dashboard_factory``) of the pinned Ray version, exactly as
  ``ray start --head`` writes them into its session directory;
* ``amad_serve.json``: the answer service's metrics (:mod:`serving.metrics`) -- requests per second by
  route and status class, error ratio, batch size and ONNX Runtime time quantiles, the served model
  version per replica -- built by the same factory from :class:`Panel` definitions, on the base of
  Ray's Serve deployment dashboard (its datasource, application, deployment and replica variables).

Ray's factory has public functions for its own dashboards only; the amad dashboard goes through its
``_generate_grafana_dashboard`` and its ``DashboardConfig``/``Panel`` dataclasses (``DeveloperAPI``),
which the pinned Ray version fixes. Load the files into Grafana (a dashboard provider directory, or
the Grafana UI's import) with a Prometheus datasource that scrapes every Ray node's metrics port.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from serving.metrics import BATCH_SIZE, INFERENCE_MS, MODEL_VERSION, PREFIX, REQUESTS

AMAD_UID = "amadServeDashboard"


def _amad_config():
    from ray.dashboard.modules.metrics.dashboards.common import DashboardConfig, GridPos, Panel, Target

    requests, batch, inference, version = (PREFIX + name for name in (REQUESTS, BATCH_SIZE, INFERENCE_MS, MODEL_VERSION))
    # Target.expr is a str.format template: the factory puts the dashboard's filters (application,
    # deployment, replica) in {global_filters}; label braces are doubled.
    selector = "{{{global_filters}}}"
    panels = [
        Panel(id=1, title="Requests per second by route and status", unit="reqps",
              description="amad_requests_total: answered requests per second, by route and status class (2xx, 4xx, 5xx).",
              targets=[Target(expr=f"sum(rate({requests}_total{selector}[5m])) by (route, status_class)",
                              legend="{{route}} {{status_class}}")],
              grid_pos=GridPos(0, 0, 12, 8)),
        Panel(id=2, title="Share of requests that failed", unit="percentunit",
              description="4xx and 5xx answers as a share of all requests to /v1/answer (5 minute rate).",
              targets=[Target(expr=f"sum(rate({requests}_total" + '{{route="/v1/answer",status_class=~"4xx|5xx",{global_filters}}}' + "[5m])) by (status_class)"
                                   f" / ignoring(status_class) group_left sum(rate({requests}_total" + '{{route="/v1/answer",{global_filters}}}' + "[5m]))",
                              legend="{{status_class}}")],
              grid_pos=GridPos(12, 0, 12, 8)),
        Panel(id=3, title="Batch size (p50, p95)", unit="short",
              description="amad_batch_size: requests that shared one ONNX Runtime call.",
              targets=[Target(expr=f"histogram_quantile({q}, sum(rate({batch}_bucket{selector}[5m])) by (le))", legend=f"p{int(q * 100)}")
                       for q in (0.5, 0.95)],
              grid_pos=GridPos(0, 8, 12, 8)),
        Panel(id=4, title="ONNX Runtime time per batch (p50, p99)", unit="ms",
              description="amad_inference_ms: milliseconds of one ONNX Runtime call, measured on the replica's worker thread.",
              targets=[Target(expr=f"histogram_quantile({q}, sum(rate({inference}_bucket{selector}[5m])) by (le))", legend=f"p{int(q * 100)}")
                       for q in (0.5, 0.99)],
              grid_pos=GridPos(12, 8, 12, 8)),
        Panel(id=5, title="Model version served", unit="none",
              description="amad_model_version: the registered version each replica serves (a champion swap shows as a step).",
              targets=[Target(expr=f"max({version}{selector}) by (model, replica)", legend="{{model}} {{replica}}")],
              grid_pos=GridPos(0, 16, 24, 8)),
    ]
    return DashboardConfig(
        name="AMAD_SERVE", default_uid=AMAD_UID, panels=panels,
        standard_global_filters=['application=~"$Application"', 'deployment=~"$Deployment"', 'replica=~"$Replica"'],
        base_json_file_name="serve_deployment_grafana_dashboard_base.json",
    )


def dashboards() -> dict[str, str]:
    """File name -> dashboard JSON text, as :func:`write` writes them."""
    from ray.dashboard.modules.metrics import grafana_dashboard_factory as factory

    # A user's RAY_GRAFANA_*_DASHBOARD_* overrides would change what the factory renders: the committed
    # files are Ray's defaults; set them when running this command for your own cluster's variant.
    built = {
        "ray_default.json": factory.generate_default_grafana_dashboard(),
        "ray_serve.json": factory.generate_serve_grafana_dashboard(),
        "ray_serve_deployment.json": factory.generate_serve_deployment_grafana_dashboard(),
        "ray_train.json": factory.generate_train_grafana_dashboard(),
        "amad_serve.json": factory._generate_grafana_dashboard(_amad_config()),
    }
    out = {}
    for name, (content, _uid) in built.items():
        dashboard = json.loads(content)
        if name == "amad_serve.json":
            dashboard["title"] = "amad: answer service"
            dashboard["description"] = "The amad answer service's own metrics (serving/metrics.py), beside Ray Serve's dashboards."
            dashboard["tags"] = ["amad", *dashboard.get("tags", [])]
        out[name] = json.dumps(dashboard, indent=2, sort_keys=True) + "\n"
    return out


def write(out_dir: str | Path) -> list[Path]:
    """Write every dashboard into ``out_dir`` (created); returns the paths. Each file is replaced atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in dashboards().items():
        path = out_dir / name
        partial = path.with_name(f".{name}.partial")
        partial.write_text(text)
        os.replace(partial, path)
        written.append(path)
    return written
