"""A loader for VQA-v2-format files: a questions JSON, an annotations JSON and an image folder.

Format (https://visualqa.org/download.html):
    questions:   {"questions": [{"image_id": int, "question": str, "question_id": int}, ...]}
    annotations: {"annotations": [{"question_id": int, "image_id": int, "multiple_choice_answer": str,
                                   "answers": [{"answer": str, ...}, ...], "question_type": str,
                                   "answer_type": str}, ...]}
    images:      <image_dir>/<anything>_<image_id zero-padded to 12 digits>.jpg (COCO names), or
                 <image_dir>/<image_id>.(jpg|png)

Each question is trained on its ``multiple_choice_answer`` (the single-label simplification; VQA's
soft scores over 10 human answers are not modelled). Questions whose answer is outside the answer
vocabulary are dropped and counted. Images load lazily, one file per access, resized to ``image_size``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from amad.data.dataset import VQASplit
from amad.data.images import to_rgb_array
from amad.data.text import encode_questions

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_TRAILING_ID = re.compile(r"(\d+)$")


def _read_json(path: Path, key: str) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{path}: expected a JSON object with a list under {key!r} (VQA-v2 format)")
    return data[key]


def index_images(image_dir: Path) -> dict[int, Path]:
    """Map image id -> file, from COCO-style names (``COCO_val2014_000000000042.jpg``) or ``42.png``."""
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: image folder not found")
    found: dict[int, Path] = {}
    for path in image_dir.iterdir():
        if path.suffix.lower() in _IMAGE_SUFFIXES:
            match = _TRAILING_ID.search(path.stem)
            if match:
                found[int(match.group(1))] = path
    return found


def top_answers(annotation_files: list[str | Path], count: int) -> tuple[str, ...]:
    """The ``count`` most frequent ``multiple_choice_answer`` strings (ties broken alphabetically)."""
    counts: Counter[str] = Counter()
    for path in annotation_files:
        counts.update(a["multiple_choice_answer"] for a in _read_json(Path(path), "annotations"))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return tuple(answer for answer, _ in ranked[:count])


def load_vqa_v2(
    questions_file: str | Path,
    annotations_file: str | Path,
    image_dir: str | Path,
    *,
    tokenizer: Tokenizer,
    answers: tuple[str, ...],
    image_size: int,
    max_question_length: int,
) -> tuple[VQASplit, dict[str, int]]:
    """Load one VQA-v2 split. Returns the split and counts (``questions``, ``kept``, ``dropped_*``).

    Question types are VQA's ``answer_type`` (``yes/no``, ``number``, ``other``).
    """
    questions = _read_json(Path(questions_file), "questions")
    annotations = {a["question_id"]: a for a in _read_json(Path(annotations_file), "annotations")}
    images = index_images(Path(image_dir))
    answer_index = {a: i for i, a in enumerate(answers)}
    kept, image_ids, texts, labels, qtypes = 0, [], [], [], []
    stats = Counter()
    for question in questions:
        annotation = annotations.get(question["question_id"])
        if annotation is None:
            stats["dropped_no_annotation"] += 1
            continue
        if question["image_id"] not in images:
            stats["dropped_missing_image"] += 1
            continue
        answer = annotation["multiple_choice_answer"]
        if answer not in answer_index:
            stats["dropped_answer_not_in_vocabulary"] += 1
            continue
        image_ids.append(question["image_id"])
        texts.append(question["question"])
        labels.append(answer_index[answer])
        qtypes.append(annotation.get("answer_type", "other"))
        kept += 1
    if not kept:
        raise ValueError(f"{questions_file}: no usable question (counts: {dict(stats)})")

    unique_ids = sorted(set(image_ids))
    position = {image_id: i for i, image_id in enumerate(unique_ids)}
    files = [images[i] for i in unique_ids]

    def load_image(index: int) -> np.ndarray:
        with Image.open(files[index]) as image:
            return to_rgb_array(image, image_size)

    type_names = tuple(sorted(set(qtypes)))
    input_ids, attention_mask = encode_questions(tokenizer, texts, max_question_length)
    split = VQASplit(
        images=load_image,
        image_index=torch.tensor([position[i] for i in image_ids], dtype=torch.long),
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=torch.tensor(labels, dtype=torch.long),
        qtype=torch.tensor([type_names.index(t) for t in qtypes], dtype=torch.long),
        answers=tuple(answers),
        qtypes=type_names,
    )
    return split, {"questions": len(questions), "kept": kept, **stats}
