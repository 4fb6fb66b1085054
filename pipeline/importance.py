"""Teacher importance scores for pruned students, computed once per teacher and data spec and cached.

A sweep's trials all prune the same teacher, so the driver scores it once (a few seconds for the
default teacher on 2,048 questions) before Ray starts and hands the scores to every trial; a
re-run finds them in ``<workdir>/importance/``. The cache key is the teacher's weights (SHA-256),
the data spec and the number of examples, so a retrained teacher or other data is scored afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

CACHE_DIR = "importance"
SCORE_BATCH_SIZE = 128


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(teacher_path: Path, benchmark: dict, examples: int) -> str:
    """A short hash of what the scores depend on: the weights, the data spec and the example count."""
    basis = {"weights": _file_sha256(teacher_path / "model.safetensors"), "benchmark": benchmark, "examples": examples}
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:16]


def teacher_importance(teacher_path: Path, data, examples: int, workdir: Path, log=print) -> dict:
    """:class:`amad.pruning.Importance` as a dict (``heads``, ``ffn``, ``examples``), cached under ``workdir``.

    ``data``: the job's data source (:mod:`amad.data.sources`: the generated benchmark's spec, or
    VQA-v2 files); the first ``examples`` training questions score the teacher (fewer if the split
    is smaller), pre-processed as the teacher's directory says.
    """
    from amad.data.captions import CaptionSpec
    from amad.data.sources import VqaV2Source, source_to_dict

    teacher_path = Path(teacher_path)
    if isinstance(data, CaptionSpec):
        return _captioner_importance(teacher_path, data, examples, workdir, log)
    generated = not isinstance(data, VqaV2Source)
    questions = min(examples, data.train_scenes * data.questions_per_scene) if generated else examples
    key = cache_key(teacher_path, source_to_dict(data), questions)
    cache_file = Path(workdir) / CACHE_DIR / f"{key}.json"
    cached = _cached(cache_file)
    if cached is not None:
        return cached
    import torch

    from amad.data.preprocess import load_preprocessor
    from amad.data.sources import load_split, model_labels
    from amad.models import ViltAdapter
    from amad.pruning import score

    if generated:  # generation is sequential per split: the first scenes of a smaller spec are the job's first scenes
        data = dataclasses.replace(data, train_scenes=math.ceil(questions / data.questions_per_scene))
    train, _ = load_split(data, "train", load_preprocessor(teacher_path), model_labels(teacher_path))
    questions = min(questions, len(train))
    model = ViltAdapter.load(teacher_path).eval()
    importance = score(model, train.subset(torch.arange(questions)).batches(SCORE_BATCH_SIZE))
    values = {**importance.to_dict(), "teacher": str(teacher_path), "key": key}
    _write(cache_file, values)
    log(f"scored the teacher's heads and FFN neurons on {questions} training questions -> {cache_file}")
    return values


def _cached(cache_file: Path) -> dict | None:
    if cache_file.is_file():
        try:
            return json.loads(cache_file.read_text())
        except ValueError:
            pass  # a torn write by a killed process: score again
    return None


def _write(cache_file: Path, values: dict) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_file.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(values))
    partial.replace(cache_file)  # atomic: a reader sees the whole file or none


def _captioner_importance(teacher_path: Path, spec, examples: int, workdir: Path, log) -> dict:
    """:class:`amad.pruning_ved.VedImportance` as a dict: a captioner's heads per kind and FFN neurons per stack,
    scored on its first ``examples`` training (image, reference) pairs; cached like the VQA teacher's."""
    from amad.data.sources import source_to_dict

    pairs = min(examples, spec.train_scenes * spec.references_per_image)
    key = cache_key(teacher_path, source_to_dict(spec), pairs)
    cache_file = Path(workdir) / CACHE_DIR / f"{key}.json"
    cached = _cached(cache_file)
    if cached is not None:
        return cached
    import torch

    from amad.data.captions import caption_training_set, make_caption_split
    from amad.data.text import load_tokenizer
    from amad.models_ved import VedAdapter
    from amad.pruning_ved import score

    # generation is sequential per split: the first images of a smaller spec are the job's first images
    scenes = math.ceil(pairs / spec.references_per_image)
    train = caption_training_set(make_caption_split(dataclasses.replace(spec, train_scenes=scenes), "train"),
                                 load_tokenizer(teacher_path), spec.max_caption_length)
    pairs = min(pairs, len(train))
    importance = score(VedAdapter.load(teacher_path).eval(), train.subset(torch.arange(pairs)).batches(SCORE_BATCH_SIZE))
    values = {**importance.to_dict(), "teacher": str(teacher_path), "key": key}
    _write(cache_file, values)
    log(f"scored the captioner's heads (per kind) and FFN neurons on {pairs} training captions -> {cache_file}")
    return values
