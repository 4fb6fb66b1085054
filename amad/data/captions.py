"""Image captioning data: templated captions of the generated scenes, and COCO-captions-format files.

**Generated captions** (the built-in captioning benchmark, issue 24). Every scene of
:mod:`amad.data.scenes` gets ``references_per_image`` captions, each a true sentence about a few of its
objects drawn from four templates::

    a red circle left of a blue square                                 (relation)
    a red circle at the top and a blue square on the left              (two positions)
    a red circle above a blue square and an orange triangle on the right   (relation + position)
    there are 5 objects and a green triangle at the bottom             (count + position)

Relations follow the larger offset between the two objects' cells (columns on a tie): "left of" /
"right of" / "above" / "below". Positions name a half of the image ("at the top" / "at the bottom",
"on the left" / "on the right"); on an odd grid an object in the middle row or column gets the other
axis, or "in the middle". Captions are at most 16 words; the vocabulary is
:func:`caption_vocabulary` (a few dozen words). Everything is a pure function of the seed.

**COCO-captions-format files** (:func:`load_coco_captions`): ``{"images": [{"id", "file_name"}, ...],
"annotations": [{"image_id", "caption"}, ...]}`` and a folder of image files, checked with errors naming
the file and the id.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from amad.data.images import pixels_from_uint8, to_rgb_array
from amad.data.scenes import COLOURS, COUNT_WORDS, SHAPES, SceneObject, SceneSpec, render, sample_scene
from amad.data.text import CLS, PAD, SEP, build_tokenizer

MAX_CAPTION_WORDS = 16
RELATIONS = ("left of", "right of", "above", "below")
POSITIONS = ("at the top", "at the bottom", "on the left", "on the right", "in the middle")
TEMPLATES = ("relation", "two_positions", "relation_position", "count_position")
SPLITS = ("train", "val", "test")
# Offsets of the benchmark seed per split (distinct from the VQA benchmark's, so caption scenes are new scenes).
_SPLIT_SEED_OFFSET = {"train": 7_000_001, "val": 8_000_009, "test": 9_000_011}


def caption_vocabulary() -> list[str]:
    """Every word a caption template can produce, sorted."""
    words = {"a", "an", "and", "there", "are", "objects", *COLOURS, *SHAPES, *COUNT_WORDS}
    for phrase in RELATIONS + POSITIONS:
        words.update(phrase.split())
    return sorted(words)


def caption_tokenizer() -> Tokenizer:
    """Word-level tokenizer over :func:`caption_vocabulary` (``[PAD]`` 0, ``[CLS]`` starts and ``[SEP]`` ends a caption)."""
    return build_tokenizer(caption_vocabulary())


def _noun_phrase(obj: SceneObject) -> str:
    article = "an" if obj.colour[0] in "aeiou" else "a"
    return f"{article} {obj.colour} {obj.shape}"


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b``, along the axis of the larger offset (columns on a tie)."""
    dc, dr = b.col - a.col, b.row - a.row
    if abs(dc) >= abs(dr):
        return "left of" if dc > 0 else "right of"
    return "above" if dr > 0 else "below"


def position(obj: SceneObject, spec: SceneSpec, rng: np.random.Generator) -> str:
    """Which half of the image ``obj`` is in, along a random axis that has an answer."""
    half = spec.grid / 2
    middle = spec.grid // 2 if spec.grid % 2 else None
    axes = []
    if obj.row != middle:
        axes.append("at the top" if obj.row < half else "at the bottom")
    if obj.col != middle:
        axes.append("on the left" if obj.col < half else "on the right")
    if not axes:
        return "in the middle"
    return axes[int(rng.integers(len(axes)))]


def describe(objects: list[SceneObject], spec: SceneSpec, rng: np.random.Generator) -> str:
    """One true caption of a scene (a random template about random objects of it)."""
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    order = rng.permutation(len(objects))
    a, b, c = (objects[int(i)] for i in order[:3]) if len(objects) >= 3 else (objects[int(order[0])], objects[int(order[1])], None)
    if template == "relation" or (template == "relation_position" and c is None):
        return f"{_noun_phrase(a)} {relation(a, b)} {_noun_phrase(b)}"
    if template == "two_positions":
        return f"{_noun_phrase(a)} {position(a, spec, rng)} and {_noun_phrase(b)} {position(b, spec, rng)}"
    if template == "relation_position":
        return f"{_noun_phrase(a)} {relation(a, b)} {_noun_phrase(b)} and {_noun_phrase(c)} {position(c, spec, rng)}"
    return f"there are {len(objects)} objects and {_noun_phrase(a)} {position(a, spec, rng)}"


@dataclass(frozen=True)
class CaptionSpec:
    """The generated captioning benchmark. Sizes are in scenes (images)."""

    seed: int = 0
    train_scenes: int = 10_000
    val_scenes: int = 200
    test_scenes: int = 1_000
    references_per_image: int = 5
    max_caption_length: int = MAX_CAPTION_WORDS + 2  # tokens: [CLS] + words + [SEP]
    scene: SceneSpec = field(default_factory=SceneSpec)

    def __post_init__(self) -> None:
        for name in ("train_scenes", "val_scenes", "test_scenes", "references_per_image"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_caption_length < MAX_CAPTION_WORDS + 2:
            raise ValueError(f"max_caption_length={self.max_caption_length} must be >= {MAX_CAPTION_WORDS + 2} "
                             f"(captions have up to {MAX_CAPTION_WORDS} words, plus [CLS] and [SEP])")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "CaptionSpec":
        values = dict(values)
        return cls(scene=SceneSpec(**values.pop("scene", {})), **values)


@dataclass
class CaptionSplit:
    """Images and their reference captions.

    ``images``: ``(N, S, S, 3)`` uint8. ``references[i]``: the captions of image ``i`` (text).
    ``image_ids[i]``: its id (the scene index as text, or a COCO file's image id).
    """

    images: np.ndarray
    references: list[list[str]]
    image_ids: list[str]

    def __len__(self) -> int:
        return len(self.image_ids)

    def reference_map(self) -> dict[str, list[str]]:
        """``image id -> references``, the form :func:`amad.metrics.caption_scores` takes."""
        return dict(zip(self.image_ids, self.references))

    def pairs(self) -> tuple[torch.Tensor, list[str]]:
        """Every (image, reference) pair as a training example: image index ``(P,)`` long and the caption texts."""
        index = [i for i, refs in enumerate(self.references) for _ in refs]
        return torch.tensor(index, dtype=torch.long), [text for refs in self.references for text in refs]


def generate_captions(num_scenes: int, references_per_image: int, seed: int, spec: SceneSpec = SceneSpec()) -> CaptionSplit:
    """``num_scenes`` scenes, each with ``references_per_image`` captions (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    images = np.empty((num_scenes, spec.image_size, spec.image_size, 3), dtype=np.uint8)
    references = []
    for index in range(num_scenes):
        objects = sample_scene(rng, spec)
        images[index] = render(objects, spec)
        references.append([describe(objects, spec, rng) for _ in range(references_per_image)])
    return CaptionSplit(images, references, [str(i) for i in range(num_scenes)])


def make_caption_split(spec: CaptionSpec, split: str) -> CaptionSplit:
    """One split of the generated captioning benchmark."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    scenes = {"train": spec.train_scenes, "val": spec.val_scenes, "test": spec.test_scenes}[split]
    return generate_captions(scenes, spec.references_per_image, spec.seed + _SPLIT_SEED_OFFSET[split], spec.scene)


def encode_captions(tokenizer: Tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> ``input_ids`` ``(N, max_length)`` long (``[CLS] words [SEP] [PAD]...``) and ``attention_mask``.

    A decoder trains on ``input_ids[:, :-1]`` to predict ``input_ids[:, 1:]`` (see :func:`teacher_forcing`).
    ValueError for a caption longer than ``max_length`` tokens (it would lose its end).
    """
    pad_id = tokenizer.token_to_id(PAD)
    ids = np.full((len(texts), max_length), pad_id, dtype=np.int64)
    for row, encoding in enumerate(tokenizer.encode_batch(texts)):
        if len(encoding.ids) > max_length:
            raise ValueError(f"caption {texts[row]!r} is {len(encoding.ids)} tokens with [CLS] and [SEP], over max_length={max_length}")
        ids[row, : len(encoding.ids)] = encoding.ids
    input_ids = torch.from_numpy(ids)
    return input_ids, (input_ids != pad_id).long()


def teacher_forcing(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Decoder inputs and targets of encoded captions ``(N, T)``: ``decoder_input_ids`` and
    ``decoder_attention_mask`` ``(N, T-1)`` (all but the last token), ``labels`` ``(N, T-1)`` (all but the
    first, ``-100`` on padding: ignored by the loss)."""
    labels = input_ids[:, 1:].clone()
    labels[attention_mask[:, 1:] == 0] = -100
    return {"decoder_input_ids": input_ids[:, :-1], "decoder_attention_mask": attention_mask[:, :-1], "labels": labels}


@dataclass
class CaptionTrainingSet:
    """(image, reference) pairs encoded for teacher forcing, over a shared image store.

    A batch is a dict: ``pixel_values`` ``(B, 3, S, S)`` float32 in [-1, 1]; ``decoder_input_ids``,
    ``decoder_attention_mask`` and ``labels`` ``(B, T-1)`` (:func:`teacher_forcing`; -100 on padding).
    """

    images: np.ndarray  # (N_img, S, S, 3) uint8
    image_index: torch.Tensor  # (P,) long
    input_ids: torch.Tensor  # (P, T) long
    attention_mask: torch.Tensor  # (P, T) long

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_values": pixels_from_uint8(self.images[self.image_index[indices].numpy()]),
                **teacher_forcing(self.input_ids[indices], self.attention_mask[indices])}

    def subset(self, indices: torch.Tensor) -> "CaptionTrainingSet":
        return CaptionTrainingSet(self.images, self.image_index[indices], self.input_ids[indices], self.attention_mask[indices])

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None, drop_last: bool = False):
        """Batches in order, or shuffled with ``generator`` (reproducible)."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        stop = len(self) - (len(self) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            yield self.batch(order[start:start + batch_size])


def caption_training_set(split: CaptionSplit, tokenizer: Tokenizer, max_length: int) -> CaptionTrainingSet:
    """Every (image, reference) pair of ``split``, encoded to ``max_length`` tokens."""
    index, texts = split.pairs()
    input_ids, attention_mask = encode_captions(tokenizer, texts, max_length)
    return CaptionTrainingSet(split.images, index, input_ids, attention_mask)


def decode_caption(tokenizer: Tokenizer, ids: list[int]) -> str:
    """Generated token ids (``generate``'s rows, start token first) -> caption text: stops at the first
    ``[SEP]`` and drops ``[CLS]`` and ``[PAD]``. (``build_tokenizer`` does not register them as special
    tokens, so ``decode(skip_special_tokens=True)`` would keep them; a stray "[CLS]" word costs a
    caption ~40 % of its CIDEr-D.) ``[UNK]`` stays: it is a word the model chose."""
    sep_id = tokenizer.token_to_id(SEP)
    if sep_id in ids:
        ids = ids[: ids.index(sep_id)]
    dropped = {tokenizer.token_to_id(CLS), tokenizer.token_to_id(PAD)}
    return tokenizer.decode([i for i in ids if i not in dropped], skip_special_tokens=False)


# ---------------------------------------------------------------- COCO-captions-format files


def load_coco_captions(annotations: str | Path, image_dir: str | Path, image_size: int) -> CaptionSplit:
    """A COCO-captions-format annotation file and its images, resized to ``image_size`` square.

    Images are in the file's ``images`` order; each gets the captions annotated for it (lower-cased,
    whitespace normalised). ValueError naming the file and the id for: a file that is not such JSON,
    an annotation for an image id the file does not list, a listed image without a caption, a
    duplicate image id, a missing or unreadable image file.
    """
    annotations, image_dir = Path(annotations), Path(image_dir)
    try:
        data = json.loads(annotations.read_text())
    except FileNotFoundError:
        raise ValueError(f"{annotations}: caption file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{annotations}: not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{annotations}: expected COCO captions format: an object with lists 'images' and 'annotations'")
    files: dict[str, str] = {}
    for entry in data["images"]:
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            raise ValueError(f"{annotations}: every entry of 'images' needs 'id' and 'file_name' (got {entry!r:.120})")
        key = str(entry["id"])
        if key in files:
            raise ValueError(f"{annotations}: image id {key} is listed twice in 'images'")
        files[key] = entry["file_name"]
    captions: dict[str, list[str]] = {key: [] for key in files}
    for entry in data["annotations"]:
        if not isinstance(entry, dict) or "image_id" not in entry or not isinstance(entry.get("caption"), str):
            raise ValueError(f"{annotations}: every entry of 'annotations' needs 'image_id' and a 'caption' string (got {entry!r:.120})")
        key = str(entry["image_id"])
        if key not in captions:
            raise ValueError(f"{annotations}: an annotation names image id {key}, which 'images' does not list")
        text = " ".join(entry["caption"].lower().split())
        if not text:
            raise ValueError(f"{annotations}: image id {key} has an empty caption")
        captions[key].append(text)
    bare = [key for key, texts in captions.items() if not texts]
    if bare:
        raise ValueError(f"{annotations}: {len(bare)} listed image(s) have no caption (e.g. image id {bare[0]})")
    if not files:
        raise ValueError(f"{annotations}: lists no images")
    images = np.empty((len(files), image_size, image_size, 3), dtype=np.uint8)
    for row, (key, name) in enumerate(files.items()):
        path = image_dir / name
        try:
            with Image.open(path) as image:
                images[row] = to_rgb_array(image, image_size)
        except FileNotFoundError:
            raise ValueError(f"{annotations}: image id {key}: file {path} not found") from None
        except (OSError, ValueError) as err:
            raise ValueError(f"{annotations}: image id {key}: {path} is not a readable image ({err})") from None
    return CaptionSplit(images, [captions[key] for key in files], list(files))
