"""Bring-your-own inputs that are wrong are named before Ray starts, and nothing is overwritten;
``amad checkpoint to-hf`` writes a stock Hugging Face ViLT checkpoint that reproduces the teacher.

Fast tests: no Ray. The jobs are checked with :func:`pipeline.train_distill.check_job` (what every
command runs before it starts a cluster) and the CLI in a subprocess, which must exit 2 with the
message and no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import ViltConfig, ViltForQuestionAnswering, ViltProcessor

from amad.data.scenes import ANSWERS, QUESTION_TYPES, vocabulary
from amad.data.vqa_v2 import write_vqa_v2
from amad.data.benchmark import BenchmarkSpec
from amad.hf_checkpoint import teacher_to_hf_checkpoint, train_wordpiece, write_vilt_checkpoint
from pipeline.config import ConfigError, DistillJobConfig, parse_config
from pipeline.train_distill import check_job

ROOT = Path(__file__).resolve().parents[1]
TINY_DISTILL = ROOT / "tune_configs" / "tiny" / "distill.yaml"


@pytest.fixture(scope="module")
def hf_teacher(tmp_path_factory) -> Path:
    texts = [template for _, template in QUESTION_TYPES.values()] + [" ".join(vocabulary())] * 3
    config = ViltConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8,
                        max_position_embeddings=16, id2label=dict(enumerate(ANSWERS)), label2id={a: i for i, a in enumerate(ANSWERS)})
    return write_vilt_checkpoint(tmp_path_factory.mktemp("hf") / "teacher", config, train_wordpiece(texts, 150))


@pytest.fixture(scope="module")
def vqa_files(tmp_path_factory) -> dict:
    spec = BenchmarkSpec(train_scenes=20, val_scenes=5, test_scenes=5)
    written = write_vqa_v2(spec, tmp_path_factory.mktemp("vqa"), splits=("train", "val", "test"))
    return {split: {key: str(files[key]) for key in ("questions", "annotations", "images")} for split, files in written.items()}


def _job(teacher: Path, data: dict | None = None, **changes) -> DistillJobConfig:
    values = yaml.safe_load(TINY_DISTILL.read_text())
    values["teacher"] = str(teacher)
    if data is not None:
        values["data"] = data
    for key, value in changes.items():
        values.setdefault(key, {}).update(value)
    return parse_config(values, DistillJobConfig, "test job")


def test_a_checkpoint_teacher_with_vqa_v2_files_passes_the_checks(hf_teacher, vqa_files):
    teacher = check_job(_job(hf_teacher, {"source": "vqa_v2", **vqa_files}, student={"init": "pruned", "heads": 2, "layers": 1}))
    assert teacher.path == hf_teacher.resolve()


def test_a_checkpoint_teacher_needs_vqa_v2_files(hf_teacher):
    with pytest.raises(ConfigError, match="data.source: the teacher .* is a Hugging Face checkpoint, which reads VQA-v2 files"):
        check_job(_job(hf_teacher))


def test_vilts_soft_target_loss_needs_human_answers(tiny_teacher):
    with pytest.raises(ConfigError, match="objective.task_loss: vqa_bce trains on the human answers of VQA-v2 files"):
        check_job(_job(tiny_teacher, objective={"task_loss": "vqa_bce"}))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["train"].update(questions="/nonexistent/q.json"), r"data\.train: .*q\.json"),
        (lambda d: d["val"].update(images="/nonexistent/images"), r"data\.val: .*nonexistent/images"),
        (lambda d: d.pop("val"), "source: vqa_v2 needs files for val"),
        (lambda d: d["train"].update(max_questions=0), r"data\.train\.max_questions: Input should be greater than or equal to 1"),
        (lambda d: d["train"].update(quesitons="x.json"), r"data\.train\.quesitons: unknown key"),
        (lambda d: d.update(train_scenes=10), "train_scenes: scene counts apply to source: generated"),
    ],
)
def test_bad_vqa_v2_data_is_named_before_ray_starts(hf_teacher, vqa_files, change, message):
    data = {"source": "vqa_v2", **json.loads(json.dumps(vqa_files))}
    change(data)
    with pytest.raises(ConfigError, match=message):
        check_job(_job(hf_teacher, data))


def test_answers_outside_the_checkpoints_labels_are_counted_as_dropped(tmp_path, vqa_files):
    labels = ("yes", "no")  # the generated benchmark's colour and shape answers are not among them
    config = ViltConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8,
                        max_position_embeddings=16, id2label=dict(enumerate(labels)), label2id={a: i for i, a in enumerate(labels)})
    teacher = write_vilt_checkpoint(tmp_path / "yes-no", config, train_wordpiece([" ".join(vocabulary())] * 3, 100))
    from pipeline.train_distill import check_data, read_teacher

    counts = check_data(read_teacher(_job(teacher, {"source": "vqa_v2", **vqa_files})))
    assert counts["train"]["dropped_answer_not_in_labels"] > 0
    assert counts["train"]["kept"] + counts["train"]["dropped_answer_not_in_labels"] == counts["train"]["questions"]


def test_max_questions_keeps_the_first_usable_questions(hf_teacher, vqa_files):
    from pipeline.train_distill import check_data, read_teacher

    data = {"source": "vqa_v2", **json.loads(json.dumps(vqa_files))}
    data["train"]["max_questions"] = 17
    counts = check_data(read_teacher(_job(hf_teacher, data)))
    assert counts["train"]["kept"] == 17


def test_the_cli_names_a_missing_file_without_a_traceback_and_writes_nothing(tmp_path, hf_teacher, vqa_files):
    values = yaml.safe_load(TINY_DISTILL.read_text())
    values["teacher"] = str(hf_teacher)
    values["data"] = {"source": "vqa_v2", **vqa_files, "train": {**vqa_files["train"], "annotations": str(tmp_path / "missing.json")}}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(values))
    workdir = tmp_path / "work"
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "distill", "--config", str(config), "--workdir", str(workdir)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "data.train:" in result.stderr and "missing.json" in result.stderr
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


def test_to_hf_writes_a_stock_checkpoint_that_reproduces_the_teacher(tmp_path, tiny_teacher):
    from amad.data.benchmark import make_split
    from amad.data.text import load_tokenizer
    from amad.models import ViltAdapter

    out = tmp_path / "hf"
    check = teacher_to_hf_checkpoint(tiny_teacher, out)
    assert check["same_tokens"] and check["max_abs_logit_diff"] <= 1e-4
    assert json.loads((out / "config.json").read_text())["architectures"] == ["ViltForQuestionAnswering"]
    # independently of the gate: stock classes on the teacher's test questions
    spec = BenchmarkSpec.from_dict(json.loads((tiny_teacher / "benchmark.json").read_text()))
    test = make_split(spec, "test", load_tokenizer(tiny_teacher))
    rows = torch.arange(16)
    batch = test.batch(rows)
    processor = ViltProcessor.from_pretrained(str(out))
    stock = ViltForQuestionAnswering.from_pretrained(str(out)).eval()
    pictures = list(test.images[test.image_index[rows].numpy()])
    pixels = processor.image_processor(images=pictures, return_tensors="pt")
    with torch.no_grad():
        expected = ViltAdapter.load(tiny_teacher).eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                                        pixel_values=batch["pixel_values"]).logits
        got = stock(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **pixels).logits
    assert (expected - got).abs().max() <= 1e-4


def test_to_hf_refuses_to_overwrite_and_names_what_is_not_a_teacher(tmp_path, tiny_teacher, hf_teacher):
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        teacher_to_hf_checkpoint(tiny_teacher, existing)
    assert (existing / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="benchmark.json"):
        teacher_to_hf_checkpoint(hf_teacher, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "checkpoint", "to-hf", "--teacher", str(tiny_teacher), "--out", str(existing)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2 and "already exists" in result.stderr and "Traceback" not in result.stderr


def test_to_hf_refuses_a_pruned_teacher(tmp_path, tiny_teacher):
    from amad.models import ViltAdapter
    from amad.pruning import prune

    pruned = prune(ViltAdapter.load(tiny_teacher), {0: [0], 1: [0]})
    target = tmp_path / "pruned"
    pruned.save_pretrained(target)
    for name in ("tokenizer.json", "benchmark.json"):
        (target / name).write_bytes((tiny_teacher / name).read_bytes())
    with pytest.raises(ValueError, match="pruned model"):
        teacher_to_hf_checkpoint(target, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_local_directory_wins_over_a_hub_name(tmp_path, monkeypatch):
    from amad.hf_checkpoint import locate_teacher

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dandelin" / "vilt-b32-finetuned-vqa").mkdir(parents=True)
    assert locate_teacher("dandelin/vilt-b32-finetuned-vqa") == tmp_path / "dandelin" / "vilt-b32-finetuned-vqa"
    assert locate_teacher("runs/a/b") == tmp_path / "runs" / "a" / "b"  # not a hub name: a path, even if missing


def test_a_hub_name_that_cannot_be_downloaded_is_named_before_ray_starts(tmp_path):
    """Offline (no cache, HF_HUB_OFFLINE=1, a hub cache under tmp_path): exit 2 naming both readings of the value."""
    values = yaml.safe_load(TINY_DISTILL.read_text())
    values["teacher"] = "nobody-here/no-such-vilt"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(values))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "distill", "--config", str(config), "--workdir", str(tmp_path / "work")],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "teacher: nobody-here/no-such-vilt: no such local directory" in result.stderr
    assert "Hugging Face hub" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "work").exists()
