"""The VQA-v2-format loader, on small files the test writes (real field names, COCO image names)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from amad.data.benchmark import BenchmarkSpec, make_split
from amad.data.preprocess import WordLevelSquare, load_preprocessor
from amad.data.text import build_tokenizer_from_texts, load_tokenizer, save_tokenizer
from amad.data.vqa_v2 import load_vqa_v2, top_answers, vqa_v2_file_names, write_vqa_v2
from amad.models import ViltAdapter
from amad.training import evaluate

ROOT = Path(__file__).resolve().parents[1]

QUESTIONS = [
    {"image_id": 42, "question": "What color is the bus?", "question_id": 420},
    {"image_id": 42, "question": "Is there a dog?", "question_id": 421},
    {"image_id": 7, "question": "How many cats are there?", "question_id": 70},
    {"image_id": 7, "question": "What is the man holding?", "question_id": 71},  # answer not in vocabulary
    {"image_id": 99, "question": "Is it raining?", "question_id": 990},  # image file missing
]
ANNOTATIONS = [
    {"question_id": 420, "image_id": 42, "multiple_choice_answer": "red", "answer_type": "other", "question_type": "what color is the", "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": 1}]},
    {"question_id": 421, "image_id": 42, "multiple_choice_answer": "no", "answer_type": "yes/no", "question_type": "is there a", "answers": [{"answer": "no", "answer_confidence": "yes", "answer_id": 1}]},
    {"question_id": 70, "image_id": 7, "multiple_choice_answer": "2", "answer_type": "number", "question_type": "how many", "answers": [{"answer": "2", "answer_confidence": "maybe", "answer_id": 1}]},
    {"question_id": 71, "image_id": 7, "multiple_choice_answer": "frisbee", "answer_type": "other", "question_type": "what is the man", "answers": [{"answer": "frisbee", "answer_confidence": "yes", "answer_id": 1}]},
    {"question_id": 990, "image_id": 99, "multiple_choice_answer": "no", "answer_type": "yes/no", "question_type": "is it", "answers": [{"answer": "no", "answer_confidence": "yes", "answer_id": 1}]},
]


@pytest.fixture()
def vqa_files(tmp_path):
    images = tmp_path / "val2014"
    images.mkdir()
    Image.new("RGB", (64, 40), (255, 0, 0)).save(images / "COCO_val2014_000000000042.jpg")
    Image.new("L", (30, 30), 128).save(images / "COCO_val2014_000000000007.jpg")  # greyscale is converted
    (tmp_path / "questions.json").write_text(json.dumps({"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "questions": QUESTIONS}))
    (tmp_path / "annotations.json").write_text(json.dumps({"info": {}, "annotations": ANNOTATIONS}))
    return tmp_path


def _square(directory, texts, image_size=32, length=12) -> WordLevelSquare:
    return WordLevelSquare(save_tokenizer(build_tokenizer_from_texts(texts), directory), image_size, length)


def test_loads_questions_answers_and_images(vqa_files):
    preprocessor = _square(vqa_files, [q["question"] for q in QUESTIONS])
    tokenizer = preprocessor.tokenizer
    answers = ("no", "red", "2")
    split, counts = load_vqa_v2(
        vqa_files / "questions.json", vqa_files / "annotations.json", vqa_files / "val2014",
        preprocessor=preprocessor, answers=answers,
    )
    assert counts == {"questions": 5, "kept": 3, "dropped_answer_not_in_labels": 1, "dropped_missing_image": 1}
    assert len(split) == 3
    assert [answers[i] for i in split.labels.tolist()] == ["red", "no", "2"]
    assert split.qtypes == ("number", "other", "yes/no")
    batch = split.batch(torch.arange(3))
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    red = batch["pixel_values"][0]
    assert red[0].mean() > 0.9 and red[1].mean() < -0.9  # the red JPEG, scaled to [-1, 1]
    grey = batch["pixel_values"][2]
    assert torch.allclose(grey[0], grey[1]) and abs(grey.mean().item() - (128 / 127.5 - 1)) < 0.02
    words = [tokenizer.id_to_token(i) for i in batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()]
    assert words == ["[CLS]", "what", "color", "is", "the", "bus", "?", "[SEP]"]


def test_top_answers_ranks_by_frequency(vqa_files):
    assert top_answers([vqa_files / "annotations.json"], 2) == ("no", "2")


def test_bad_files_are_named(vqa_files, tmp_path):
    kwargs = dict(preprocessor=_square(tmp_path, ["a"], length=8), answers=("no",))
    with pytest.raises(FileNotFoundError, match="missing.json: file not found"):
        load_vqa_v2(tmp_path / "missing.json", vqa_files / "annotations.json", vqa_files / "val2014", **kwargs)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_vqa_v2(tmp_path / "bad.json", vqa_files / "annotations.json", vqa_files / "val2014", **kwargs)
    (tmp_path / "wrong.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="expected a JSON object with a list under 'questions'"):
        load_vqa_v2(tmp_path / "wrong.json", vqa_files / "annotations.json", vqa_files / "val2014", **kwargs)
    with pytest.raises(ValueError, match="no usable question"):
        load_vqa_v2(vqa_files / "questions.json", vqa_files / "annotations.json", vqa_files / "val2014", **{**kwargs, "answers": ("maybe",)})
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_vqa_v2(vqa_files / "questions.json", vqa_files / "annotations.json", tmp_path / "nope", **kwargs)
    mismatched = [dict(a, image_id=7) if a["question_id"] == 420 else a for a in ANNOTATIONS]
    (tmp_path / "mismatched.json").write_text(json.dumps({"annotations": mismatched}))
    with pytest.raises(ValueError, match=r"mismatched.json does not match .*questions.json: 1 annotations are about another image"
                                         r" \(question 420: image 42 in the questions, 7 in the annotations\)"):
        load_vqa_v2(vqa_files / "questions.json", tmp_path / "mismatched.json", vqa_files / "val2014", **kwargs)
    no_humans = [{k: v for k, v in a.items() if k != "answers"} for a in ANNOTATIONS]
    (tmp_path / "no_humans.json").write_text(json.dumps({"annotations": no_humans}))
    with pytest.raises(ValueError, match=r"no_humans.json: annotation #0 \(question 420\) needs a list of human 'answers'"):
        load_vqa_v2(vqa_files / "questions.json", tmp_path / "no_humans.json", vqa_files / "val2014", **kwargs)
    empty = tmp_path / "empty_images"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no usable question \(counts: \{'dropped_missing_image': 5\}"):
        load_vqa_v2(vqa_files / "questions.json", vqa_files / "annotations.json", empty, **kwargs)
    (vqa_files / "val2014" / "COCO_val2014_000000000042.jpg").write_bytes(b"not a jpeg")
    split, _ = load_vqa_v2(vqa_files / "questions.json", vqa_files / "annotations.json", vqa_files / "val2014", **kwargs)
    with pytest.raises(ValueError, match=r"COCO_val2014_000000000042.jpg: not a readable image"):
        split.batch(torch.arange(len(split)))


def test_human_answers_give_vqa_accuracy_and_labels_match_under_normalisation(vqa_files, tmp_path):
    annotations = [dict(a, answers=[{"answer": a["multiple_choice_answer"]}] * 10) for a in ANNOTATIONS]  # unanimous
    annotations[2] = dict(annotations[2], multiple_choice_answer="two",
                          answers=[{"answer": "two"}] * 2 + [{"answer": "3"}] * 8)  # 2 of 10 say "two", 8 say "3"
    (tmp_path / "annotations.json").write_text(json.dumps({"annotations": annotations}))
    split, counts = load_vqa_v2(vqa_files / "questions.json", tmp_path / "annotations.json", vqa_files / "val2014",
                                preprocessor=_square(tmp_path, ["a"]), answers=("no", "red", "2", "3"))
    assert counts["kept"] == 3 and split.labels.tolist() == [1, 0, 2]  # "two" found the label "2"
    # predicting "3" on the third question: wrong by exact match, right by 8 of 10 humans (score 1)
    report = evaluate_predictions(split, torch.tensor([1, 0, 3]))
    assert report["accuracy"] == pytest.approx(2 / 3) and report["vqa_accuracy"] == pytest.approx(1.0)
    # predicting its label "2": "two" after the official normalisation of predictions matches... only the
    # humans' "two", which the official code leaves alone when humans disagree: 0 of 10 match
    report = evaluate_predictions(split, torch.tensor([1, 0, 2]))
    assert report["accuracy"] == pytest.approx(1.0) and report["vqa_accuracy"] == pytest.approx(2 / 3)
    assert report["vqa_acc/number"] == 0.0 and report["vqa_acc/other"] == 1.0
    targets = split.batch(torch.arange(3))["soft_targets"]
    assert targets[0].tolist() == [0, 1, 0, 0] and targets[2].tolist() == [0, 0, 0, 1]


def evaluate_predictions(split, predictions):
    from amad.training import accuracy_report

    return accuracy_report(predictions, split)


def test_the_generated_benchmark_written_as_vqa_v2_files(tmp_path):
    spec = BenchmarkSpec(train_scenes=6, val_scenes=3, test_scenes=2, questions_per_scene=4)
    written = write_vqa_v2(spec, tmp_path, agreement=7)
    assert sorted(written) == ["test", "train", "val"]
    names = vqa_v2_file_names("val")
    assert written["val"]["questions"] == str(tmp_path / names["questions"]) == str(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json")
    annotations = json.loads((tmp_path / names["annotations"]).read_text())["annotations"]
    questions = json.loads((tmp_path / names["questions"]).read_text())["questions"]
    generated = make_split(spec, "val", build_tokenizer_from_texts(["a"]))
    assert len(questions) == len(annotations) == len(generated) == 12
    assert sorted(p.name for p in (tmp_path / "val2014").iterdir())[0] == "COCO_val2014_000002000000.jpg"
    for annotation in annotations:
        humans = [a["answer"] for a in annotation["answers"]]
        assert len(humans) == 10 and humans.count(annotation["multiple_choice_answer"]) == 7
    assert [a["multiple_choice_answer"] for a in annotations] == [generated.answers[i] for i in generated.labels.tolist()]
    assert {a["answer_type"] for a in annotations} <= {"yes/no", "number", "other"}
    with pytest.raises(ValueError, match="agreement=5: between 6 and 10"):
        write_vqa_v2(spec, tmp_path / "x", agreement=5)


def test_the_committed_teacher_scores_the_same_on_the_files_as_on_the_generated_split(tmp_path):
    """The known-answer check of the real-format path: same scenes, same teacher, same accuracy."""
    teacher = ROOT / "weights" / "teacher-default"
    spec = BenchmarkSpec.from_dict(json.loads((teacher / "benchmark.json").read_text()))
    write_vqa_v2(spec, tmp_path, splits=("val",), max_scenes=40)
    model = ViltAdapter.load(teacher).eval()
    labels = tuple(model.config.id2label[i] for i in range(model.config.num_labels))
    names = vqa_v2_file_names("val")
    files, counts = load_vqa_v2(tmp_path / names["questions"], tmp_path / names["annotations"], tmp_path / names["images"],
                                preprocessor=load_preprocessor(teacher), answers=labels)
    assert counts == {"questions": 400, "kept": 400}
    generated = make_split(spec, "val", load_tokenizer(teacher)).subset(torch.arange(400))
    on_files, on_generated = evaluate(model, ViltAdapter, files), evaluate(model, ViltAdapter, generated)
    assert abs(on_files["accuracy"] - on_generated["accuracy"]) <= 0.02  # JPEG (q95, no chroma subsampling) vs raw pixels
    assert on_files["vqa_accuracy"] >= on_files["accuracy"]  # a wrong answer that 2 humans gave still scores 0.3


def test_amad_data_export_vqa_v2_writes_loadable_files(tmp_path, capsys):
    from pipeline.cli import main

    teacher = ROOT / "weights" / "teacher-default"
    assert main(["data", "export-vqa-v2", "--out", str(tmp_path), "--teacher", str(teacher), "--splits", "val", "--max-scenes", "3"]) == 0
    printed = capsys.readouterr().out
    assert "source: vqa_v2" in printed and "# 30 questions, 3 images" in printed
    names = vqa_v2_file_names("val")
    assert len(json.loads((tmp_path / names["questions"]).read_text())["questions"]) == 30
    assert main(["data", "export-vqa-v2", "--out", str(tmp_path / "bad"), "--agreement", "5"]) == 2
    assert "agreement=5: between 6 and 10" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["data", "export-vqa-v2", "--out", str(tmp_path / "bad"), "--teacher", str(tmp_path)]) == 2
    assert "no benchmark.json" in capsys.readouterr().err
