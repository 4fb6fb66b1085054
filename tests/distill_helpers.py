"""Shared helpers for the distillation tests (imported by the test modules)."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.config import DistillJobConfig, parse_config, with_overrides

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tune_configs" / "tiny" / "distill.yaml"


def tiny_config(teacher: Path, preset: Path = TINY, **changes) -> DistillJobConfig:
    """The tiny preset (``tune_configs/tiny/distill.yaml`` unless ``preset``) pointed at ``teacher``; ``changes`` are
    dotted keys (``"scaling.num_workers": 3``)."""
    values = yaml.safe_load(preset.read_text())
    values["teacher"] = str(teacher)
    return parse_config(with_overrides(values, changes), DistillJobConfig, "tiny distill")
