"""The teacher job on its tiny preset: saves a loadable model, baselines, resumes, and the committed teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from amad.data.benchmark import BenchmarkSpec, benchmark_tokenizer, make_split
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


class Crash(Exception):
    """Stands in for the process dying mid-run."""


def _count_training_steps(model: torch.nn.Module, crash_after: int | None = None) -> list[int]:
    """Counts the model's training-mode forwards (one per optimizer step; evaluation runs in eval
    mode); with ``crash_after``, the forward after that many steps raises :class:`Crash`."""
    count = [0]

    def hook(module, args, kwargs):
        if module.training:
            if crash_after is not None and count[0] == crash_after:
                raise Crash(f"crashed before step {count[0] + 1}")
            count[0] += 1

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return count


def test_an_interrupted_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(tmp_path):
    cfg = load_config(TINY, TeacherJobConfig)
    torch.set_num_threads(cfg.threads)  # as main() does: the comparison below is bit for bit
    spec = cfg.data.benchmark_spec()
    tokenizer = benchmark_tokenizer()
    train, val = make_split(spec, "train", tokenizer), make_split(spec, "val", tokenizer)
    steps, every = cfg.train.steps, cfg.eval_every
    crash_at = every + every // 2  # between the first checkpoint and the next one
    assert every < crash_at < steps

    def run(model, checkpoint_dir):
        return train_teacher.train_model(
            cfg, model, train, val, steps=steps, blank_images=False, checkpoint_dir=checkpoint_dir, name="t"
        )

    def fresh():  # what a restarted process builds before it looks for a checkpoint
        return train_teacher.build_model(cfg, train.answers, tokenizer.get_vocab_size(), seed=cfg.train.seed)

    straight = fresh()
    want = run(straight, None)

    scratch = tmp_path / "teacher"
    first = fresh()
    first_steps = _count_training_steps(first, crash_after=crash_at)
    with pytest.raises(Crash):
        run(first, scratch)
    assert first_steps[0] == crash_at
    # The crash lost the steps after the last checkpoint; the run is not finished.
    saved = torch.load(scratch / train_teacher.CHECKPOINT_FILE, weights_only=False)
    assert saved["step"] == every and [e["step"] for e in saved["history"]] == [every]

    second = fresh()
    second_steps = _count_training_steps(second)
    got = run(second, scratch)
    # It continued from the checkpoint (only the remaining steps ran) and finished...
    assert second_steps[0] == steps - every
    assert [e["step"] for e in got] == list(range(every, steps + 1, every))
    assert torch.load(scratch / train_teacher.CHECKPOINT_FILE, weights_only=False)["step"] == steps
    # ...exactly where the uninterrupted run ended: same weights, same evaluations (timing aside).
    for (name, a), b in zip(straight.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    timing = {"samples_per_s"}
    assert [{k: v for k, v in e.items() if k not in timing} for e in got] == [
        {k: v for k, v in e.items() if k not in timing} for e in want
    ]
    assert not torch.equal(next(iter(fresh().parameters())), next(iter(second.parameters())))


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
