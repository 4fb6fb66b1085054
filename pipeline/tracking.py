"""MLflow tracking for pipeline jobs: one MLflow run per Ray Train run, resumed with it.

The driver opens (or re-opens) the run before ``fit`` and logs the config as params and the
teacher as tags; rank 0 of the workers logs per-epoch metrics through a picklable
:class:`RunTracker`; the driver logs the best checkpoint as artifacts and closes the run. The run id
is kept in ``<run_dir>/mlflow_run.json`` so that re-running the same job (same workdir and run name)
keeps logging to the same MLflow run.

Only ``MlflowClient`` is used (no fluent ``mlflow.start_run``): nothing here depends on a process's
"active run", so a Ray worker and the driver can both write to the same run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.names import MLFLOW_RUN_FILE

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"


def resolve_tracking_uri(workdir: str | Path, explicit: str | None = None) -> str:
    """``explicit``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store ``<workdir>/mlflow.db`` (absolute)."""
    uri = explicit or os.environ.get(TRACKING_URI_ENV)
    if uri:
        return uri
    return f"sqlite:///{(Path(workdir).resolve() / DEFAULT_DB).as_posix()}"


def flatten(values: dict, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": "1", "c": "[1, 2]"}`` (MLflow params are strings)."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


@dataclass(frozen=True)
class RunTracker:
    """A handle on one MLflow run; plain strings, so it pickles into Ray workers."""

    tracking_uri: str
    run_id: str
    experiment_id: str

    def _client(self):
        from mlflow.tracking import MlflowClient  # imported where used: workers other than rank 0 never pay for it

        return MlflowClient(self.tracking_uri)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log numeric ``metrics`` at ``step`` (non-numbers are skipped)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), now, step)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        self._client().log_batch(self.run_id, metrics=batch)

    def logged_steps(self, key: str) -> set[int]:
        """Steps at which ``key`` was logged (to backfill what a crashed attempt did not log)."""
        return {m.step for m in self._client().get_metric_history(self.run_id, key)}

    def log_params(self, params: dict[str, str]) -> None:
        """Log params not logged yet; a param that changed on resume becomes tag ``resumed.<name>``.

        MLflow refuses to overwrite a param with a different value, and a resumed run may legitimately
        change a few settings (e.g. the number of workers).
        """
        from mlflow.entities import Param, RunTag

        client = self._client()
        existing = client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        changed = [RunTag(f"resumed.{k}", v) for k, v in params.items() if k in existing and existing[k] != v]
        for start in range(0, len(new), 100):  # log_batch takes at most 100 params per call
            client.log_batch(self.run_id, params=new[start : start + 100])
        if changed:
            client.log_batch(self.run_id, tags=changed)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._client().log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_directory(self, directory: str | Path, artifact_path: str, skip: tuple[str, ...] = ()) -> None:
        """Upload the files of ``directory`` (not recursive) under ``artifact_path``, except ``skip``."""
        client = self._client()
        for path in sorted(Path(directory).iterdir()):
            if path.is_file() and path.name not in skip:
                client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED``."""
        self._client().set_terminated(self.run_id, status)


def open_run(
    *,
    tracking_uri: str,
    experiment: str,
    run_name: str,
    run_dir: Path,
    workdir: Path,
) -> RunTracker:
    """Re-open the MLflow run recorded in ``run_dir`` or create one; marks it RUNNING.

    A new experiment in a local store (SQLite/file) keeps its artifacts under ``<workdir>/mlartifacts``
    rather than MLflow's default of the current directory.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    record = run_dir / MLFLOW_RUN_FILE
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("tracking_uri") == tracking_uri:
            try:
                run = client.get_run(saved["run_id"])
                if run.info.lifecycle_stage == "active":
                    client.update_run(run.info.run_id, status="RUNNING")
                    return RunTracker(tracking_uri, run.info.run_id, run.info.experiment_id)
            except MlflowException:
                pass  # deleted or from another store: start a new run below

    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        local = tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri
        location = (workdir / DEFAULT_ARTIFACTS).resolve().as_uri() if local else None
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    run = client.create_run(experiment_id, run_name=run_name)
    tracker = RunTracker(tracking_uri, run.info.run_id, experiment_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"tracking_uri": tracking_uri, "run_id": tracker.run_id, "experiment_id": experiment_id}, indent=2))
    return tracker
