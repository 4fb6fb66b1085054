"""``amad run`` settings: which teacher, which sweep and export settings, the smoke test and the report.

The sweep and export settings are the same YAML files their own commands read (paths relative to
the current directory, like every path in these configs); ``amad run`` validates them all before
any stage starts.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from pipeline.config import StorageConfig, Strict


class TeacherStageConfig(Strict):
    path: Path | None = Field(None, description="an existing teacher directory (saved by `amad teacher`: a ViLT or a captioner; or a Hugging Face ViLT VQA checkpoint)")
    train_config: Path | None = Field(None, description="or: a teacher YAML to train (model.family: ved trains a captioner; reused when its config has not changed)")

    @model_validator(mode="after")
    def _one(self) -> "TeacherStageConfig":
        if (self.path is None) == (self.train_config is None):
            raise ValueError("give exactly one of teacher.path (an existing teacher) or teacher.train_config (a teacher YAML)")
        return self


class SmokeConfig(Strict):
    enabled: bool = Field(True, description="start Ray Serve on the champion, ask test questions over HTTP, compare, stop")
    questions: int = Field(8, ge=1, le=256, description="test-split questions asked")
    port: int = Field(8471, ge=0, le=65535, description="the port Serve listens on (127.0.0.1); 0: any free port, chosen when the test starts")

    @field_validator("port")
    @classmethod
    def _not_privileged(cls, port: int) -> int:
        if 0 < port < 1024:
            raise ValueError(f"port {port} is privileged: give 0 (any free port) or a port in 1024-65535")
        return port


class ReportConfig(Strict):
    alignment_examples: int = Field(256, ge=1, description="validation questions the alignment heatmap averages over")
    latency_repeats: int = Field(50, ge=1, description="batch-1 ONNX Runtime runs timed per model (teacher and student interleaved)")
    latency_threads: int = Field(1, ge=1, le=256, description="ONNX Runtime intra-op threads, the same for teacher and student")
    max_accuracy_drop: float | None = Field(None, ge=0, le=100, description="target: student test accuracy >= teacher's minus this many points")
    max_latency_ratio: float | None = Field(None, gt=0, description="target: student ORT batch-1 p50 <= this fraction of the teacher's "
                                                                      "(a captioner: the greedy caption's)")
    max_cider_drop: float | None = Field(None, ge=0, le=1, description="captioners' target: student test CIDEr-D >= (1 - this) x the teacher's")


class RunJobConfig(Strict):
    """``amad run``: teacher -> sweep -> selection -> export and gates -> registry -> smoke test -> report."""

    name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=40)
    teacher: TeacherStageConfig
    sweep: Path = Field(..., description="the sweep YAML; its job.teacher is replaced by the teacher stage's teacher")
    export: Path = Field(..., description="the export settings YAML (the source is the sweep's choice)")
    smoke: SmokeConfig = SmokeConfig()
    report: ReportConfig = ReportConfig()
    storage: StorageConfig = Field(
        StorageConfig(), description="replaces the sweep YAML's storage: checkpoints go to <storage.path>/sweeps/<sweep>/ (default: the sweep's, else --workdir)"
    )
