"""``amad export`` settings: what to export, the gates it must pass, where it is registered."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config import Strict


class GateConfig(Strict):
    parity_examples: int = Field(256, ge=1, description="validation examples compared between PyTorch and ONNX Runtime")
    max_abs_logit_diff: float = Field(1e-4, gt=0, description="fp32 parity: largest |logit difference| allowed")
    min_top1_agreement: float = Field(1.0, gt=0, le=1, description="fraction of examples whose top answer must agree")
    int8_max_accuracy_drop: float = Field(0.01, ge=0, le=1, description="int8: validation accuracy may fall this much below fp32")


class RegistryConfig(Strict):
    enabled: bool = Field(True, description="log to MLflow and register a model version when the gates pass")
    student_model: str = Field("amad-student", min_length=1, description="registered model name of students")
    teacher_model: str = Field("amad-teacher", min_length=1, description="registered model name of teachers")
    captioner_model: str = Field("amad-captioner", min_length=1, description="registered model name of captioners (both ONNX graphs, a pyfunc model)")
    promote: bool = Field(True, description="move the champion alias when every gate passes (else: challenger)")
    require_no_worse: bool = Field(
        True, description="promote only if validation accuracy is >= the current champion's; otherwise the new version is the challenger"
    )


class ExportJobConfig(Strict):
    """One export: a student checkpoint (or a sweep's choice) -> ONNX, gated, registered."""

    checkpoint: str | None = Field(
        None, description="a student checkpoint directory (epoch_NNNN): a path, or a URI in the training job's storage (s3://..., gs://..., file:///...)"
    )
    sweep: str | None = Field(None, description="a sweep name: its <workdir>/sweeps/<name>/best.json picks the checkpoint")
    teacher: Path | None = Field(None, description="the teacher directory (default: the one the training run recorded)")
    name: str | None = Field(None, min_length=1, description="export directory name under <workdir>/exports (default: from the checkpoint)")
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    opset: int = Field(18, ge=14, le=23)
    optimize: bool = Field(True, description="try ONNX Runtime graph optimisation; kept only if it passes the parity gate")
    int8: bool = Field(False, description="ship a dynamically quantised int8 model (gated on validation accuracy)")
    gates: GateConfig = GateConfig()
    registry: RegistryConfig = RegistryConfig()
    latency_repeats: int = Field(50, ge=1, description="batch-1 runs timed for the latency tags")
    threads: int | None = Field(None, ge=1, description="torch and ONNX Runtime threads; default: all cores")
    force_export: bool = Field(False, description="export again even if the export directory holds a file made from the same checkpoint")

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _uri_intact(cls, value):
        """A URI that went through ``Path`` (``s3://b/x`` -> ``s3:/b/x``) gets its ``//`` back."""
        if value is None:
            return value
        text = str(value)
        scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)", text)
        if scheme and scheme.group(1).lower() != "file":  # file:/path is a valid local URI as it is
            text = f"{scheme.group(1)}://{text[scheme.end():]}"
        return text

    @model_validator(mode="after")
    def _one_source(self) -> "ExportJobConfig":
        # Neither is allowed here (a YAML of settings, the source given on the command line);
        # export.resolve_source refuses to run without one.
        if self.checkpoint is not None and self.sweep is not None:
            raise ValueError("give only one of checkpoint (a checkpoint directory) or sweep (a sweep name)")
        return self
