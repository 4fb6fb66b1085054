"""The answer service's own Prometheus metrics, beside Ray Serve's.

Recorded by each replica with Ray Serve's custom metrics (``ray.serve.metrics``); every Ray node's
metrics agent exports them at its ``metrics_export_port`` with Ray's ``ray_`` prefix, where Prometheus
scrapes Ray's own (``deploy/k8s/podmonitor.yaml`` on KubeRay). Serve adds the ``deployment``,
``replica`` and ``application`` labels itself.

================================  =========  ==========================================================
exported as                       type       labels and meaning
================================  =========  ==========================================================
``ray_amad_requests_total``       counter    ``route`` (``/v1/answer``, ``/``...), ``status_class``
                                             (``2xx``, ``4xx``, ``5xx``): requests answered
``ray_amad_batch_size``           histogram  requests that shared one ONNX Runtime call
``ray_amad_inference_ms``         histogram  milliseconds of one ONNX Runtime call (one batch)
``ray_amad_model_version``        gauge      ``model`` (registered name): the version this replica serves
================================  =========  ==========================================================

:class:`ServiceMetrics` is built in the replica's constructor, where Serve's replica context supplies
those labels; ``enabled=False`` records nothing (the deployment's methods called outside a replica).
"""

from __future__ import annotations

PREFIX = "ray_"  # what Ray's exporter puts in front of every custom metric's name
REQUESTS = "amad_requests"  # a counter: exported with the suffix _total
BATCH_SIZE = "amad_batch_size"
INFERENCE_MS = "amad_inference_ms"
MODEL_VERSION = "amad_model_version"

BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]
INFERENCE_MS_BUCKETS = [0.25, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]


def status_class(status: int) -> str:
    """``404`` -> ``"4xx"``: a label with a handful of values, whatever codes a route returns."""
    return f"{status // 100}xx"


def version_number(version: str) -> float:
    """A registered version as the gauge's value (MLflow's versions are integers); -1 if not a number."""
    try:
        return float(int(version))
    except (TypeError, ValueError):
        return -1.0


class ServiceMetrics:
    """The service's metrics for one replica (see the module docstring for names and labels)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from ray.serve import metrics

        self._requests = metrics.Counter(REQUESTS, description="Requests answered by the amad service, by route and status class.",
                                         tag_keys=("route", "status_class"))
        self._batch_size = metrics.Histogram(BATCH_SIZE, description="Requests that shared one ONNX Runtime call.",
                                             boundaries=BATCH_SIZE_BUCKETS)
        self._inference_ms = metrics.Histogram(INFERENCE_MS, description="Milliseconds of one ONNX Runtime call (one batch).",
                                               boundaries=INFERENCE_MS_BUCKETS)
        self._model_version = metrics.Gauge(MODEL_VERSION, description="The registered model version this replica serves.",
                                            tag_keys=("model",))

    def request(self, route: str, status: int) -> None:
        if self.enabled:
            self._requests.inc(1, tags={"route": route, "status_class": status_class(status)})

    def batch(self, size: int, seconds: float) -> None:
        if self.enabled:
            self._batch_size.observe(size)
            self._inference_ms.observe(seconds * 1e3)

    def serving(self, name: str, version: str) -> None:
        if self.enabled:
            self._model_version.set(version_number(version), tags={"model": name})
