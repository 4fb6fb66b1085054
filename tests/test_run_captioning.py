"""`amad run` with a captioning teacher: teacher -> sweep by validation CIDEr-D -> export of both graphs -> registry
(``amad-captioner``) -> smoke test on ``POST /v1/caption`` -> report (CIDEr-D, BLEU-4, caption latency, one alignment
heatmap per attention kind). Real local Ray, real MLflow (SQLite), real Serve on 127.0.0.1.

The pipeline runs once through the CLI (the session's trained tiny captioner as ``teacher.path``: the
untrained-teacher preset would make every caption the same and the smoke test vacuous), then again; the
settings checks run without Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.config import ConfigError, parse_config
from pipeline.run_config import RunJobConfig

ROOT = Path(__file__).resolve().parents[1]
TINY_CAPTIONING_RUN = ROOT / "tune_configs" / "tiny" / "captioning.yaml"
KINDS = ("encoder_self", "decoder_self", "cross")


def run_values(**sections) -> dict:
    values = yaml.safe_load(TINY_CAPTIONING_RUN.read_text())
    for key, value in sections.items():
        values[key] = value
    return values


def settings_of(values: dict):
    from pipeline.run import Settings

    return Settings(parse_config(values, RunJobConfig, "test run"))


def test_the_tiny_captioning_preset_is_a_captioning_run():
    assert settings_of(run_values()).family == "ved"
    assert settings_of(yaml.safe_load((ROOT / "tune_configs" / "tiny" / "run.yaml").read_text())).family == "vilt"


@pytest.mark.parametrize(("change", "message"), [
    ({"sweep": "tune_configs/tiny/demo/sweep.yaml"}, r"job.objective.kinds=\['self'\] are not attention kinds of the teacher, a captioner"),
    ({"report": {"max_accuracy_drop": 5}}, r"report.max_accuracy_drop: the teacher is a captioner; its quality target is report.max_cider_drop"),
])
def test_settings_that_do_not_suit_a_captioner_are_named_before_anything_runs(change, message):
    with pytest.raises(ConfigError, match=message):
        settings_of(run_values(**change))


def test_a_vqa_run_refuses_captioning_settings_and_a_captioning_sweep():
    vqa = yaml.safe_load((ROOT / "tune_configs" / "tiny" / "run.yaml").read_text())
    with pytest.raises(ConfigError, match=r"report.max_cider_drop: the teacher is a VQA model"):
        settings_of({**vqa, "report": {**vqa["report"], "max_cider_drop": 0.05}})
    with pytest.raises(ConfigError, match=r"job.objective.kinds=\['encoder_self', 'decoder_self', 'cross'\] are not attention kinds of the teacher, a VQA model"):
        settings_of({**vqa, "sweep": "tune_configs/tiny/captioning-sweep.yaml"})


@pytest.fixture(scope="module")
def finished_captioning_run(trained_tiny_captioner, tmp_path_factory):
    """The tiny captioning pipeline through the CLI with the trained tiny captioner as its teacher, then again."""
    root = tmp_path_factory.mktemp("run-captioning")
    config = root / "captioning.yaml"
    config.write_text(yaml.safe_dump(run_values(teacher={"path": str(trained_tiny_captioner)})))
    workdir = root / "work"
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    command = [sys.executable, "-m", "pipeline.cli", "run", "--config", str(config), "--workdir", str(workdir)]
    first = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return {"workdir": workdir, "first": first, "second": second, "teacher": trained_tiny_captioner}


@pytest.mark.integration
def test_the_tiny_captioning_pipeline_registers_a_captioner_serves_it_and_reports(finished_captioning_run):
    from mlflow.tracking import MlflowClient

    from pipeline.registry import CHAMPION, Registry

    workdir, teacher = finished_captioning_run["workdir"], finished_captioning_run["teacher"]
    summary = json.loads((workdir / "run" / "summary.json").read_text())
    for stage in ("teacher", "sweep", "export", "smoke", "report"):
        assert f"[run tiny-captioning] {stage}: done" in finished_captioning_run["first"].stdout, stage
    recorded = json.loads((teacher / "metrics.json").read_text())["test"]["teacher_greedy"]
    assert summary["teacher"]["family"] == "ved" and summary["teacher"]["test_cider_d"] == recorded["cider_d"]
    assert summary["sweep"]["metric"] == "val_cider_d" and summary["sweep"]["val_score"] == pytest.approx(summary["export"]["val_cider_d"], abs=1e-6)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    champion = Registry(uri).alias_version("amad-captioner", CHAMPION)
    assert summary["export"]["model_uri"] == f"models:/amad-captioner/{champion.version}" and summary["export"]["alias"] == CHAMPION

    smoke = summary["smoke"]
    assert smoke["agreed"] == smoke["questions"] == 4 and len(set(smoke["served"])) > 1, smoke

    comparison = summary["report"]["comparison"]
    # the teacher's greedy captions over ONNX Runtime are generate's (the parity gate), so its test CIDEr-D is the recorded one
    assert comparison["teacher"]["cider_d"] == pytest.approx(recorded["cider_d"], abs=1e-9)
    assert comparison["teacher"]["bleu_4"] == pytest.approx(recorded["bleu_4"], abs=1e-9)
    assert comparison["latency_ratio"] == pytest.approx(comparison["student"]["p50_ms"] / comparison["teacher"]["p50_ms"])
    assert comparison["targets"]["latency"] == {"max_ratio": 0.6, "met": comparison["latency_ratio"] <= 0.6}
    ratio = comparison["student"]["cider_d"] / comparison["teacher"]["cider_d"]
    assert comparison["targets"]["cider_d"] == {"max_drop": 0.05, "met": ratio >= 0.95}
    assert comparison["student"]["parameters"] < comparison["teacher"]["parameters"] and comparison["student"]["pruned"]

    report = workdir / "report"
    markdown = (report / "report.md").read_text()
    assert "| teacher |" in markdown and "| student |" in markdown and "(captioning)" in markdown
    verdict = "met" if comparison["targets"]["cider_d"]["met"] else "NOT met"
    assert f"student >= (1 - 0.05) x the teacher's: **{verdict}**" in markdown
    alignment = json.loads((report / "alignment.json").read_text())
    assert {layer["kind"] for layer in alignment} == set(KINDS)
    student_config = json.loads((Path(summary["sweep"]["checkpoint"]) / "config.json").read_text())
    record = student_config["amad_pruning"]
    for layer in alignment:
        weights = np.asarray(layer["weights"])
        assert np.allclose(weights.sum(1), 1.0, atol=1e-6) and layer["examples"] > 0
        stack, key = {"encoder_self": ("encoder", "heads"), "decoder_self": ("decoder", "self_heads"), "cross": ("decoder", "cross_heads")}[layer["kind"]]
        kept = record[stack][key][layer["student_layer"]]
        assert weights.shape[1] == len(kept)
        assert layer["student_head_origins"] == [[record[stack]["teacher_layers"][layer["student_layer"]], h] for h in kept]
    for kind in KINDS:
        assert (report / f"alignment_{kind}.png").stat().st_size > 0 and f"alignment_{kind}.png" in markdown
    assert (report / "learning_curves.png").is_file()

    client = MlflowClient(uri)
    run = client.get_run(summary["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and "student_test_cider_d" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} >= {"report/report.md", "report/alignment_cross.png"}


@pytest.mark.integration
def test_running_the_finished_captioning_command_again_trains_nothing(finished_captioning_run):
    second = finished_captioning_run["second"].stdout
    for stage in ("teacher", "sweep", "export", "smoke", "report"):
        assert f"[run tiny-captioning] {stage}: reused" in second, stage
