"""Where a job's questions come from: the built-in generated benchmark, or VQA-v2 files.

A data source is saved as a small JSON dict (``benchmark.json`` beside a teacher or checkpoint, and
in every worker's loop config): the generated benchmark's :class:`~amad.data.benchmark.BenchmarkSpec`
as it always was (no ``source`` key), or ``{"source": "vqa_v2", "train": {questions, annotations,
images}, "val": {...}, "test": {...}}``; the generated captions of a captioner (``{"source":
"captions", ...}``, :class:`~amad.data.captions.CaptionSpec`). :func:`load_split` turns one split of either into a
:class:`~amad.data.dataset.VQASplit` through the model's :class:`~amad.data.preprocess.Preprocessor`,
with the model's answer labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from amad.data.benchmark import SPLITS, BenchmarkSpec, make_split
from amad.data.captions import CaptionSpec
from amad.data.dataset import VQASplit
from amad.data.preprocess import Preprocessor, WordLevelSquare

GENERATED, VQA_V2, CAPTIONS = "generated", "vqa_v2", "captions"
SOURCES = (GENERATED, VQA_V2, CAPTIONS)
FILE_KEYS = ("questions", "annotations", "images")
OPTIONAL_KEYS = ("max_questions",)


@dataclass(frozen=True)
class VqaV2Source:
    """VQA-v2-format files per split: ``{split: {"questions": path, "annotations": path, "images": folder}}``,
    each optionally with ``max_questions`` (the first that many usable questions)."""

    splits: dict[str, dict[str, str | int]]

    def to_dict(self) -> dict:
        return {"source": VQA_V2, **{split: dict(files) for split, files in self.splits.items()}}

    def files(self, split: str) -> dict[str, str]:
        if split not in self.splits:
            raise ValueError(f"the data source has no {split!r} split (VQA-v2 files are given for {sorted(self.splits)})")
        return self.splits[split]


DataSource = BenchmarkSpec | VqaV2Source | CaptionSpec


def source_from_dict(values: dict) -> DataSource:
    """The data source a ``benchmark.json`` (or a loop config) describes; ValueError naming a bad one."""
    values = dict(values)
    source = values.pop("source", GENERATED)
    if source == GENERATED:
        return BenchmarkSpec.from_dict(values)
    if source == CAPTIONS:
        return CaptionSpec.from_dict(values)
    if source == VQA_V2:
        unknown = set(values) - set(SPLITS)
        if unknown:
            raise ValueError(f"vqa_v2 data: unknown splits {sorted(unknown)} (known: {list(SPLITS)})")
        for split, files in values.items():
            if not isinstance(files, dict) or not set(FILE_KEYS) <= set(files) <= set(FILE_KEYS + OPTIONAL_KEYS):
                raise ValueError(f"vqa_v2 data: split {split!r} needs exactly {list(FILE_KEYS)} (and may have {list(OPTIONAL_KEYS)})")
        return VqaV2Source({split: {k: (v if k in OPTIONAL_KEYS else str(v)) for k, v in files.items() if v is not None}
                            for split, files in values.items()})
    raise ValueError(f"data source {source!r} is not one of {list(SOURCES)}")


def source_to_dict(source: DataSource) -> dict:
    if isinstance(source, CaptionSpec):  # captions.json beside a captioner has no source key; a loop config needs one
        return {"source": CAPTIONS, **source.to_dict()}
    return source.to_dict()


def source_name(source: DataSource) -> str:
    if isinstance(source, CaptionSpec):
        return CAPTIONS
    return VQA_V2 if isinstance(source, VqaV2Source) else GENERATED


def load_split(source: DataSource, split: str, preprocessor: Preprocessor, answers: tuple[str, ...]) -> tuple[VQASplit, dict[str, int]]:
    """One split of ``source`` as the model sees it, and its counts (``questions``, ``kept``, ``dropped_*``).

    ``answers`` are the model's labels in index order (its ``id2label``). The generated benchmark
    has its own answer list, which must be the model's (a teacher trained on it), and needs this
    project's word-level pre-processing.
    """
    if isinstance(source, VqaV2Source):
        from amad.data.vqa_v2 import load_vqa_v2

        files = source.files(split)
        return load_vqa_v2(files["questions"], files["annotations"], files["images"], preprocessor=preprocessor, answers=answers,
                           max_questions=files.get("max_questions"))
    if not isinstance(preprocessor, WordLevelSquare):
        raise ValueError(
            "the generated benchmark is written for this project's own teachers (word-level tokenizer, square images); "
            "for a Hugging Face checkpoint write it as VQA-v2 files (amad data export-vqa-v2) and use data.source: vqa_v2"
        )
    data = make_split(source, split, preprocessor.tokenizer)
    if tuple(answers) != tuple(data.answers):
        raise ValueError(
            f"the model's {len(answers)} answer labels are not the generated benchmark's {len(data.answers)} answers "
            "(a teacher trained on other data: give its data as VQA-v2 files, data.source: vqa_v2)"
        )
    return data, {"questions": len(data), "kept": len(data)}


def resolve_paths(source: DataSource, base: Path) -> DataSource:
    """``source`` with relative VQA-v2 file paths made absolute against ``base`` (workers may run elsewhere)."""
    if not isinstance(source, VqaV2Source):
        return source
    return VqaV2Source({
        split: {key: (value if key in OPTIONAL_KEYS else str((base / Path(value).expanduser()).resolve())) for key, value in files.items()}
        for split, files in source.splits.items()
    })


SOURCE_FILE = "benchmark.json"  # beside a teacher or checkpoint: the data source it was trained on


def model_labels(directory: str | Path) -> tuple[str, ...]:
    """A saved model's answer labels in index order (its ``config.json`` ``id2label``)."""
    import json

    id2label = json.loads((Path(directory) / "config.json").read_text())["id2label"]
    return tuple(id2label[str(i)] for i in range(len(id2label)))


def split_for_model(directory: str | Path, split: str, source: DataSource | None = None) -> VQASplit:
    """One split as the model saved in ``directory`` reads it: its pre-processing, its labels and, by
    default, the data source it was trained on (its ``benchmark.json``)."""
    import json

    from amad.data.preprocess import load_preprocessor

    directory = Path(directory)
    if source is None:
        source = source_from_dict(json.loads((directory / SOURCE_FILE).read_text()))
    return load_split(source, split, load_preprocessor(directory), model_labels(directory))[0]
