"""A loader for VQA-v2-format files: a questions JSON, an annotations JSON and an image folder.

Format (https://visualqa.org/download.html):
    questions:   {"questions": [{"image_id": int, "question": str, "question_id": int}, ...]}
    annotations: {"annotations": [{"question_id": int, "image_id": int, "multiple_choice_answer": str,
                                   "answers": [{"answer": str, ...}, ...], "question_type": str,
                                   "answer_type": str}, ...]}
    images:      <image_dir>/<anything>_<image_id zero-padded to 12 digits>.jpg (COCO names), or
                 <image_dir>/<image_id>.(jpg|png)

Answers are the model's labels (a checkpoint's ``id2label``, 3,129 for ViLT-VQA). Each question's
``multiple_choice_answer`` is its single label (exact-match accuracy, cross-entropy); its human
answers give VQA's soft accuracy and ViLT's soft targets (:mod:`amad.data.vqa_eval`). Questions
whose label is not one of the model's answers, whose image is missing or that have no annotation
are dropped and counted; a file that does not match its partner (an annotation about another image)
is an error. Images load lazily, one file per access, through the model's :class:`Preprocessor`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from amad.data.benchmark import BenchmarkSpec
from amad.data.dataset import VQASplit
from amad.data.preprocess import Preprocessor
from amad.data.scenes import ANSWERS
from amad.data.vqa_eval import HumanAnswers, normalize_prediction

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
    preprocessor: Preprocessor,
    answers: tuple[str, ...],
    max_questions: int | None = None,
) -> tuple[VQASplit, dict[str, int]]:
    """Load one VQA-v2 split. Returns the split and counts (``questions``, ``kept``, ``dropped_*``).

    ``max_questions`` keeps the first that many usable questions in the file's order (a training
    subset, or a validation split small enough to evaluate every epoch).

    Question types are VQA's ``answer_type`` (``yes/no``, ``number``, ``other``).
    """
    questions_file, annotations_file = Path(questions_file), Path(annotations_file)
    questions = _read_json(questions_file, "questions")
    annotations = _index_annotations(annotations_file)
    images = index_images(Path(image_dir))
    answer_index = _label_index(answers)
    image_ids, texts, labels, qtypes, humans = [], [], [], [], []
    stats: Counter[str] = Counter()
    mismatched = []
    for number, question in enumerate(questions):
        if max_questions is not None and len(labels) >= max_questions:
            break
        try:
            question_id, image_id, text = question["question_id"], question["image_id"], question["question"]
        except (KeyError, TypeError):
            raise ValueError(f"{questions_file}: question #{number} lacks question_id, image_id or question") from None
        annotation = annotations.get(question_id)
        if annotation is None:
            stats["dropped_no_annotation"] += 1
            continue
        if annotation.get("image_id", image_id) != image_id:
            mismatched.append(f"question {question_id}: image {image_id} in the questions, {annotation['image_id']} in the annotations")
            continue
        if image_id not in images:
            stats["dropped_missing_image"] += 1
            continue
        answer = annotation["multiple_choice_answer"]
        label = answer_index.get(answer, answer_index.get(normalize_prediction(answer)))
        if label is None:
            stats["dropped_answer_not_in_labels"] += 1
            continue
        image_ids.append(image_id)
        texts.append(text)
        labels.append(label)
        qtypes.append(annotation.get("answer_type", "other"))
        humans.append([entry["answer"] for entry in annotation["answers"]])
    if mismatched:
        raise ValueError(
            f"{annotations_file} does not match {questions_file}: {len(mismatched)} annotations are about another image"
            f" ({'; '.join(mismatched[:3])})"
        )
    kept = len(labels)
    if not kept:
        raise ValueError(f"{questions_file}: no usable question (counts: {dict(stats)}; labels: {len(answers)} answers)")

    unique_ids = sorted(set(image_ids))
    position = {image_id: i for i, image_id in enumerate(unique_ids)}
    files = [images[i] for i in unique_ids]

    def load_image(index: int) -> np.ndarray:
        try:
            with Image.open(files[index]) as image:
                image.load()
                return preprocessor.image_array(image)
        except (OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"{files[index]}: not a readable image ({err})") from None

    type_names = tuple(sorted(set(qtypes)))
    input_ids, attention_mask = preprocessor.encode(texts)
    split = VQASplit(
        images=load_image,
        image_index=torch.tensor([position[i] for i in image_ids], dtype=torch.long),
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=torch.tensor(labels, dtype=torch.long),
        qtype=torch.tensor([type_names.index(t) for t in qtypes], dtype=torch.long),
        answers=tuple(answers),
        qtypes=type_names,
        pixels=preprocessor.pixels,
        human_answers=HumanAnswers.build(humans, answers),
    )
    return split, {"questions": len(questions), "kept": kept, **stats}


def _label_index(answers: tuple[str, ...]) -> dict[str, int]:
    """Label strings -> index, also under VQA's normalisation ("Two" and "2" find the label "2")."""
    index: dict[str, int] = {}
    for i, answer in enumerate(answers):
        index.setdefault(normalize_prediction(answer), i)
    for i, answer in enumerate(answers):
        index[answer] = i  # an exact string wins over a normalised one
    return index


def _index_annotations(path: Path) -> dict[int, dict]:
    """Annotations by question id; ValueError naming the file for entries without the VQA-v2 fields."""
    indexed = {}
    for number, annotation in enumerate(_read_json(path, "annotations")):
        if not isinstance(annotation, dict) or "question_id" not in annotation or "multiple_choice_answer" not in annotation:
            raise ValueError(f"{path}: annotation #{number} lacks question_id or multiple_choice_answer")
        answers = annotation.get("answers")
        if not isinstance(answers, list) or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
            raise ValueError(f"{path}: annotation #{number} (question {annotation['question_id']}) needs a list of human"
                             " 'answers' with an 'answer' string each")
        indexed[annotation["question_id"]] = annotation
    return indexed


# Image ids of the written splits: disjoint ranges, as COCO's train and val ids are.
_SPLIT_IMAGE_OFFSET = {"train": 1_000_000, "val": 2_000_000, "test": 3_000_000}


def vqa_v2_file_names(split: str) -> dict[str, str]:
    """The VQA-v2 download's own names for one split (``questions``, ``annotations``, ``images`` folder)."""
    return {
        "questions": f"v2_OpenEnded_mscoco_{split}2014_questions.json",
        "annotations": f"v2_mscoco_{split}2014_annotations.json",
        "images": f"{split}2014",
    }


def _answer_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "number" if answer.isdigit() else "other"


def write_vqa_v2(
    spec: BenchmarkSpec,
    out_dir: str | Path,
    *,
    splits: tuple[str, ...] = ("train", "val", "test"),
    agreement: int = 8,
    max_scenes: int | None = None,
    seed: int = 0,
) -> dict[str, dict]:
    """Write the generated benchmark as VQA-v2 files, so the real-format path runs on data with a known answer.

    Per split: ``v2_OpenEnded_mscoco_<split>2014_questions.json``, ``v2_mscoco_<split>2014_annotations.json``
    and ``<split>2014/COCO_<split>2014_<image id:012d>.jpg``. Each question gets 10 human answers:
    ``agreement`` give the true answer, the others a different answer drawn from the benchmark's
    answers (deterministic in ``seed``), so VQA's soft accuracy has something to do; the
    ``multiple_choice_answer`` is the true one. ``max_scenes`` caps the scenes per split (first
    ones). Returns, per split, the paths written and the counts.
    """
    from amad.data.benchmark import split_scenes

    if not 6 <= agreement <= 10:
        raise ValueError(f"agreement={agreement}: between 6 and 10 of the 10 humans must give the true answer (a strict majority)")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    written = {}
    for split in splits:
        images, questions = split_scenes(spec, split, max_scenes)
        names = vqa_v2_file_names(split)
        image_dir = out_dir / names["images"]
        image_dir.mkdir(parents=True, exist_ok=True)
        offset = _SPLIT_IMAGE_OFFSET[split]
        for scene, pixels in enumerate(images):
            Image.fromarray(pixels).save(image_dir / f"COCO_{split}2014_{offset + scene:012d}.jpg", quality=95, subsampling=0)  # no chroma subsampling: colours are the answer
        question_rows, annotation_rows = [], []
        per_scene: Counter[int] = Counter()
        for question in questions:
            image_id = offset + question.scene
            question_id = image_id * 1000 + per_scene[question.scene]
            per_scene[question.scene] += 1
            others = [a for a in ANSWERS if a != question.answer]
            humans = [question.answer] * agreement + [others[i] for i in rng.integers(0, len(others), 10 - agreement)]
            question_rows.append({"image_id": image_id, "question": question.text, "question_id": question_id})
            annotation_rows.append({
                "question_id": question_id, "image_id": image_id, "question_type": question.qtype,
                "answer_type": _answer_type(question.answer), "multiple_choice_answer": question.answer,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(humans)],
            })
        common = {"info": {"description": f"amad generated benchmark (seed {spec.seed}), {split} split"}, "data_type": "mscoco",
                  "data_subtype": f"{split}2014", "license": {}}
        questions_file, annotations_file = out_dir / names["questions"], out_dir / names["annotations"]
        questions_file.write_text(json.dumps({**common, "task_type": "Open-Ended", "questions": question_rows}))
        annotations_file.write_text(json.dumps({**common, "annotations": annotation_rows}))
        written[split] = {"questions": str(questions_file), "annotations": str(annotations_file), "images": str(image_dir),
                          "count": {"images": len(images), "questions": len(question_rows)}}
    return written
