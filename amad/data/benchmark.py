"""The built-in generated benchmark: splits, tokenizer and answer vocabulary from one small config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tokenizers import Tokenizer

from amad.data.dataset import VQASplit
from amad.data.scenes import ANSWERS, QUESTION_TYPES, Question, SceneSpec, generate, vocabulary
from amad.data.text import build_tokenizer, encode_questions

SPLITS = ("train", "val", "test")
# Split seeds are offsets of the benchmark seed, so train/val/test scenes never coincide.
_SPLIT_SEED_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_029}


@dataclass(frozen=True)
class BenchmarkSpec:
    """Sizes are in scenes; every scene gets ``questions_per_scene`` questions (types in rotation)."""

    seed: int = 0
    train_scenes: int = 10_000
    val_scenes: int = 500
    test_scenes: int = 1_000
    questions_per_scene: int = 10
    max_question_length: int = 16
    scene: SceneSpec = field(default_factory=SceneSpec)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "BenchmarkSpec":
        values = dict(values)
        scene = SceneSpec(**values.pop("scene", {}))
        return cls(scene=scene, **values)


def benchmark_tokenizer() -> Tokenizer:
    """The tokenizer of the generated benchmark: its whole template vocabulary."""
    return build_tokenizer(vocabulary())


def split_scenes(spec: BenchmarkSpec, split: str, max_scenes: int | None = None) -> tuple[np.ndarray, list[Question]]:
    """The images ``(N, S, S, 3)`` uint8 and questions of one split; ``max_scenes`` keeps its first scenes
    (generation is sequential, so they are the same scenes as in the whole split)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    scenes = {"train": spec.train_scenes, "val": spec.val_scenes, "test": spec.test_scenes}[split]
    if max_scenes is not None:
        scenes = min(scenes, max_scenes)
    return generate(scenes, spec.questions_per_scene, spec.seed + _SPLIT_SEED_OFFSET[split], spec.scene)


def make_split(spec: BenchmarkSpec, split: str, tokenizer: Tokenizer) -> VQASplit:
    """Generate one split (deterministic in ``spec.seed`` and ``split``)."""
    images, questions = split_scenes(spec, split)
    qtypes = tuple(QUESTION_TYPES)
    input_ids, attention_mask = encode_questions(tokenizer, [q.text for q in questions], spec.max_question_length)
    return VQASplit(
        images=images,
        image_index=torch.tensor([q.scene for q in questions], dtype=torch.long),
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=torch.tensor([ANSWERS.index(q.answer) for q in questions], dtype=torch.long),
        qtype=torch.tensor([qtypes.index(q.qtype) for q in questions], dtype=torch.long),
        answers=ANSWERS,
        qtypes=qtypes,
        relational_qtypes=tuple(name for name, (relational, _) in QUESTION_TYPES.items() if relational),
    )
