"""The teacher job on its tiny preset: saves a loadable model, baselines, resumes, and the committed teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from amad.data.benchmark import BenchmarkSpec, make_split
from amad.data.text import load_tokenizer
from amad.models import ViltAdapter
from amad.training import evaluate
from pipeline import train_teacher
from pipeline.config import TeacherJobConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tune_configs" / "tiny" / "teacher.yaml"
DEFAULT_TEACHER = ROOT / "weights" / "teacher-default"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("teacher")
    cfg = load_config(TINY, TeacherJobConfig)
    metrics = train_teacher.main(cfg, workdir)
    return cfg, workdir, metrics


def test_saved_teacher_loads_and_reproduces_its_test_accuracy(tiny_run):
    cfg, workdir, metrics = tiny_run
    saved = workdir / "teacher"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "benchmark.json", "metrics.json", "teacher.yaml", "accuracy.md"):
        assert (saved / name).is_file(), name
    model = ViltAdapter.load(saved)
    spec = BenchmarkSpec.from_dict(json.loads((saved / "benchmark.json").read_text()))
    test = make_split(spec, "test", load_tokenizer(saved))
    assert evaluate(model, ViltAdapter, test)["accuracy"] == pytest.approx(metrics["test"]["teacher"]["accuracy"])
    assert not (workdir / "teacher-train").exists()  # scratch checkpoints are removed once saved


def test_metrics_hold_the_baselines_and_per_type_accuracy(tiny_run):
    _, _, metrics = tiny_run
    assert set(metrics["test"]) == {"teacher", "question_only", "answer_prior"}
    for row in metrics["test"].values():
        assert 0.0 <= row["accuracy"] <= 1.0
        assert "relational_accuracy" in row and "acc/closest_shape" in row
    assert isinstance(metrics["uses_image"], bool)
    assert [entry["step"] for entry in metrics["history"]] == [20, 40]


def test_training_resumes_from_its_checkpoint(tmp_path):
    cfg = load_config(TINY, TeacherJobConfig)
    tokenizer_spec = cfg.data.benchmark_spec()
    from amad.data.benchmark import benchmark_tokenizer

    tokenizer = benchmark_tokenizer()
    train, val = make_split(tokenizer_spec, "train", tokenizer), make_split(tokenizer_spec, "val", tokenizer)
    first = train_teacher.build_model(cfg, train.answers, tokenizer.get_vocab_size(), seed=0)
    history = train_teacher.train_model(cfg, first, train, val, steps=cfg.train.steps, blank_images=False, checkpoint_dir=tmp_path, name="t")
    assert (tmp_path / train_teacher.CHECKPOINT_FILE).is_file()
    # a fresh process would rebuild the model from scratch: it must pick the finished state up, not retrain
    second = train_teacher.build_model(cfg, train.answers, tokenizer.get_vocab_size(), seed=0)
    resumed = train_teacher.train_model(cfg, second, train, val, steps=cfg.train.steps, blank_images=False, checkpoint_dir=tmp_path, name="t")
    assert resumed == history
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_committed_default_teacher_uses_the_image():
    """The shipped weights reproduce the accuracy table committed beside them, on a slice of the test split."""
    metrics = json.loads((DEFAULT_TEACHER / "metrics.json").read_text())
    assert metrics["uses_image"] is True
    assert metrics["gap_vs_best_blind"] >= 0.20 and metrics["relational_gap_vs_best_blind"] >= 0.20
    model = ViltAdapter.load(DEFAULT_TEACHER)
    spec = BenchmarkSpec.from_dict(json.loads((DEFAULT_TEACHER / "benchmark.json").read_text()))
    spec = BenchmarkSpec.from_dict({**spec.to_dict(), "test_scenes": 200})  # the first 200 test scenes
    test = make_split(spec, "test", load_tokenizer(DEFAULT_TEACHER))
    accuracy = evaluate(model, ViltAdapter, test)["accuracy"]
    # 2,000 questions: the full-split figure must lie within 4 standard errors of this slice's
    assert abs(accuracy - metrics["test"]["teacher"]["accuracy"]) < 4 * (0.25 / len(test)) ** 0.5
