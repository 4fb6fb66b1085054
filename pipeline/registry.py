"""The MLflow Model Registry side of ``amad export``: log ONNX models, register versions, move aliases.

* A model is logged with ``mlflow.onnx.log_model`` (tensor signature with dynamic batch and text
  length, a small input example, execution providers chosen for this machine) inside an export run,
  and registered as a new version of its registered model. Versions are never overwritten.
* ``champion`` moves to a new version only when the caller says every gate passed and the version is
  no worse than the current champion (when ``require_no_worse``); otherwise the new version becomes
  ``challenger``. Nothing is registered for a candidate that failed a gate.
* Teachers are registered too (``amad-teacher`` by default), one version per distinct weights file
  (tag ``weights_sha256``), so every student version can name the teacher version that taught it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHAMPION = "champion"
CHALLENGER = "challenger"
EXPORT_EXPERIMENT = "amad-export"
TAG_WEIGHTS_SHA = "weights_sha256"
TAG_VAL_ACCURACY = "val_accuracy"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def onnx_signature(num_labels: int, image_size: int, masked: bool = False):
    """Inputs ``input_ids``/``attention_mask`` ``(-1, -1)`` int64, ``pixel_values`` ``(-1, 3, S, S)``
    float32; output ``logits`` ``(-1, num_labels)``. -1 marks the dynamic batch and text dims, so
    MLflow's schema check accepts any batch size and question length. ``masked``: a model fed by a
    checkpoint's image processor: ``pixel_values`` ``(-1, 3, -1, -1)`` and ``pixel_mask``
    ``(-1, -1, -1)`` int64 (images of any size, padded per batch)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    side = -1 if masked else image_size
    specs = [
        TensorSpec(np.dtype("int64"), (-1, -1), "input_ids"),
        TensorSpec(np.dtype("int64"), (-1, -1), "attention_mask"),
        TensorSpec(np.dtype("float32"), (-1, 3, side, side), "pixel_values"),
    ]
    if masked:
        specs.append(TensorSpec(np.dtype("int64"), (-1, -1, -1), "pixel_mask"))
    outputs = Schema([TensorSpec(np.dtype("float32"), (-1, num_labels), "logits")])
    return ModelSignature(inputs=Schema(specs), outputs=outputs)


@dataclass(frozen=True)
class Registered:
    name: str
    version: str
    alias: str | None  # champion, challenger, or None (an existing version found again)
    model_uri: str  # models:/<name>/<version>
    run_id: str


class Registry:
    """Registry operations against one tracking/registry URI (``MlflowClient`` only: no process-wide state)."""

    def __init__(self, tracking_uri: str):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # ------------------------------------------------------------------ queries

    def alias_version(self, name: str, alias: str):
        """The version holding ``alias``, or None (no such model or alias)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None

    def versions(self, name: str) -> list:
        from mlflow.exceptions import MlflowException

        try:
            return list(self.client.search_model_versions(f"name = '{name}'"))
        except MlflowException:
            return []

    def find_by_tag(self, name: str, key: str, value: str):
        """The newest version of ``name`` tagged ``key=value``, or None."""
        matches = [v for v in self.versions(name) if v.tags.get(key) == value]
        return max(matches, key=lambda v: int(v.version)) if matches else None

    # ------------------------------------------------------------------ writes

    def start_run(self, experiment: str, run_name: str, artifact_root: Path | None) -> str:
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            local = self.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in self.tracking_uri
            location = artifact_root.resolve().as_uri() if local and artifact_root else None
            experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            experiment_id = found.experiment_id
        return self.client.create_run(experiment_id, run_name=run_name).info.run_id

    def log_and_register(
        self,
        *,
        run_id: str,
        onnx_path: Path,
        name: str,
        artifact_name: str,
        signature,
        input_example: dict[str, np.ndarray],
        providers: list[str],
        tags: dict[str, str],
        extra_files: list[Path] | tuple[Path, ...] = (),
    ) -> tuple[str, str]:
        """Save ``onnx_path`` as an MLflow ONNX model, upload it to ``run_id``'s artifacts under
        ``artifact_name`` and register it as a new version of ``name`` (created with its tags in one
        call); returns ``(version, model_uri)``.

        ``extra_files`` (e.g. ``tokenizer.json``, ``config.json``, ``benchmark.json``) land in the model
        directory's ``extra_files/``: what a server needs besides the graph to turn an image and a
        question into inputs and logits into answers (``serving/model.py`` reads them).

        ``mlflow.onnx.save_model`` + ``MlflowClient`` rather than the fluent ``log_model``: the fluent
        API sets process-wide tracking/registry URIs (and ``MLFLOW_TRACKING_URI``), which would leak into
        whatever the process does next.
        """
        import tempfile

        import mlflow.onnx
        import onnx

        model = onnx.load(str(onnx_path))
        with tempfile.TemporaryDirectory() as scratch:
            local = Path(scratch) / artifact_name
            mlflow.onnx.save_model(
                model,
                str(local),
                signature=signature,
                input_example=input_example,
                onnx_execution_providers=providers,
                save_as_external_data=False,
                extra_files=[str(path) for path in extra_files] or None,
            )
            self.client.log_artifacts(run_id, str(local), artifact_name)
        return self._new_version(run_id, artifact_name, name, tags)

    def log_and_register_pyfunc(self, *, run_id: str, python_model, artifacts: dict[str, Path], name: str, artifact_name: str,
                                signature, input_example, tags: dict[str, str], pip_requirements: list[str]) -> tuple[str, str]:
        """As :meth:`log_and_register`, for a model that is more than one ONNX graph: an MLflow pyfunc model
        (``python_model``) whose ``artifacts`` (name -> file) are copied into it; returns ``(version, model_uri)``."""
        import tempfile

        import mlflow.pyfunc

        with tempfile.TemporaryDirectory() as scratch:
            local = Path(scratch) / artifact_name
            mlflow.pyfunc.save_model(str(local), python_model=python_model, artifacts={k: str(v) for k, v in artifacts.items()},
                                     signature=signature, input_example=input_example, pip_requirements=pip_requirements)
            self.client.log_artifacts(run_id, str(local), artifact_name)
        return self._new_version(run_id, artifact_name, name, tags)

    def _new_version(self, run_id: str, artifact_name: str, name: str, tags: dict[str, str]) -> tuple[str, str]:
        """Register the run's artifact ``artifact_name`` as a new version of ``name`` (created if new)."""
        from mlflow.exceptions import MlflowException

        source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact_name}"
        try:
            self.client.create_registered_model(name)
        except MlflowException:
            pass  # it exists already
        version = self.client.create_model_version(name, source, run_id=run_id, tags=tags)
        return str(version.version), f"models:/{name}/{version.version}"

    def promote(self, name: str, version: str, accuracy: float, *, promote: bool, require_no_worse: bool,
                metric: str = TAG_VAL_ACCURACY) -> tuple[str, str]:
        """Move ``champion`` (or, when not promoted, ``challenger``) to ``version``; returns (alias, reason).

        ``accuracy`` is the new version's ``metric`` (a tag every version carries; higher is better:
        ``val_accuracy`` for students, ``val_cider_d`` for captioners)."""
        if not promote:
            alias, reason = CHALLENGER, "promotion disabled (registry.promote: false)"
        else:
            current = self.alias_version(name, CHAMPION)
            current_accuracy = float(current.tags.get(metric, "nan")) if current is not None else None
            if current is None:
                alias, reason = CHAMPION, "first champion"
            elif not require_no_worse or not accuracy < current_accuracy:
                alias, reason = CHAMPION, f"{metric} {accuracy:.4f} >= champion v{current.version}'s {current_accuracy:.4f}"
            else:
                alias, reason = CHALLENGER, f"{metric} {accuracy:.4f} < champion v{current.version}'s {current_accuracy:.4f}"
        self.client.set_registered_model_alias(name, alias, version)
        self.client.set_model_version_tag(name, version, "promotion", reason)
        return alias, reason
