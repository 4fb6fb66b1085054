"""The VQA-v2-format loader, on small files the test writes (real field names, COCO image names)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from amad.data.text import build_tokenizer_from_texts
from amad.data.vqa_v2 import load_vqa_v2, top_answers

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


def test_loads_questions_answers_and_images(vqa_files):
    tokenizer = build_tokenizer_from_texts(q["question"] for q in QUESTIONS)
    answers = ("no", "red", "2")
    split, counts = load_vqa_v2(
        vqa_files / "questions.json", vqa_files / "annotations.json", vqa_files / "val2014",
        tokenizer=tokenizer, answers=answers, image_size=32, max_question_length=12,
    )
    assert counts == {"questions": 5, "kept": 3, "dropped_answer_not_in_vocabulary": 1, "dropped_missing_image": 1}
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
    tokenizer = build_tokenizer_from_texts(["a"])
    kwargs = dict(tokenizer=tokenizer, answers=("no",), image_size=32, max_question_length=8)
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
