"""Pre-processing from one place: how a model's questions and images become tensors.

Training, the export parity gate, the served model and ``amad loadtest`` all take their
pre-processing from a :class:`Preprocessor` built by :func:`load_preprocessor` from the model's
directory, so a question and an image become the same tensors everywhere. Two kinds:

* :class:`WordLevelSquare`: this project's own teachers (``amad teacher``): a word-level
  ``tokenizer.json`` built with ``tokenizers``, images resized to the config's square ``image_size``
  (bilinear), pixels ``x / 127.5 - 1``; no ``pixel_mask``.
* :class:`CheckpointProcessor`: a Hugging Face ViLT checkpoint saved with ``save_pretrained`` and
  ``ViltProcessor.save_pretrained`` (``preprocessor_config.json`` + the tokenizer files). Its own
  ``transformers`` classes do the work: the tokenizer (BERT WordPiece for ViLT) and the image
  processor (aspect-preserving resize of the shortest edge, rounding to ``size_divisor``, rescale,
  normalise, padding per batch with a ``pixel_mask``).

Images are kept as ``(H, W, 3)`` uint8 RGB arrays between decoding and batching
(:meth:`Preprocessor.image_array`); :meth:`Preprocessor.pixels` turns a list of them into the
model's image inputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from amad.data.images import open_image, pixels_from_uint8, rgb, to_rgb_array
from amad.data.text import TOKENIZER_FILE, count_words, encode_questions, load_tokenizer

PROCESSOR_FILE = "preprocessor_config.json"
# transformers 5 writes the image processor's settings inside processor_config.json; older
# checkpoints (the hub's ViLT) have preprocessor_config.json. Either is the processor's config.
PROCESSOR_FILES = (PROCESSOR_FILE, "processor_config.json")
# what a Hugging Face tokenizer may have written; the ones present are shipped with a model
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


class Preprocessor:
    """Questions -> ``input_ids``/``attention_mask``; images -> ``pixel_values`` (and ``pixel_mask``)."""

    kind: str
    max_text_length: int
    masked: bool  # whether batches carry a pixel_mask (images of any size, padded per batch)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, max_text_length)`` long ``input_ids`` and ``attention_mask``; over-long questions are truncated."""
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` becomes, without the two special tokens the model adds."""
        raise NotImplementedError

    def image_array(self, image: Image.Image) -> np.ndarray:
        """A PIL image -> the ``(H, W, 3)`` uint8 array batches are built from."""
        raise NotImplementedError

    def pixels(self, images: list[np.ndarray] | np.ndarray) -> dict[str, torch.Tensor]:
        """Arrays from :meth:`image_array` -> ``{"pixel_values": (B, 3, H, W) float32[, "pixel_mask": (B, H, W) long]}``."""
        raise NotImplementedError

    def files(self) -> list[Path]:
        """The files a model needs to rebuild this pre-processing (shipped with a registered model)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What a report or ``/v1/model`` says about the pre-processing."""
        raise NotImplementedError

    def decode(self, data: bytes, max_pixels: int | None = None) -> np.ndarray:
        """Encoded image bytes -> :meth:`image_array`; ValueError naming the problem (see :func:`open_image`)."""
        return self.image_array(open_image(data, max_pixels))

    def save(self, directory: str | Path) -> list[Path]:
        """Copy :meth:`files` into ``directory``; returns the copies."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        copies = []
        for path in self.files():
            target = directory / path.name
            if path.resolve() != target.resolve():
                shutil.copy2(path, target)
            copies.append(target)
        return copies


class WordLevelSquare(Preprocessor):
    """This project's own teachers: word-level tokenizer, square images of ``image_size`` pixels."""

    kind = "word_level_square"
    masked = False

    def __init__(self, tokenizer_file: str | Path, image_size: int, max_text_length: int):
        self.tokenizer_file = Path(tokenizer_file)
        self.tokenizer = load_tokenizer(self.tokenizer_file)
        self.image_size = int(image_size)
        self.max_text_length = int(max_text_length)

    def encode(self, texts):
        return encode_questions(self.tokenizer, list(texts), self.max_text_length)

    def count_tokens(self, text):
        return count_words(self.tokenizer, text)

    def image_array(self, image):
        return to_rgb_array(image, self.image_size)

    def pixels(self, images):
        return {"pixel_values": pixels_from_uint8(np.stack(images) if isinstance(images, list) else images)}

    def files(self):
        return [self.tokenizer_file]

    def describe(self):
        return {"kind": self.kind, "image_size": self.image_size, "resize": "square", "max_text_length": self.max_text_length}


class CheckpointProcessor(Preprocessor):
    """A Hugging Face ViLT checkpoint's own tokenizer and image processor (``transformers`` classes)."""

    kind = "checkpoint"
    masked = True

    def __init__(self, directory: str | Path, max_text_length: int):
        from transformers import AutoImageProcessor, AutoTokenizer

        self.directory = Path(directory)
        if not is_checkpoint_processor(self.directory):
            raise FileNotFoundError(f"{self.directory}: no {' or '.join(PROCESSOR_FILES)} (save it with ViltProcessor.save_pretrained)")
        try:
            # PIL backend: the reference implementation, and torchvision is not a dependency
            self.image_processor = AutoImageProcessor.from_pretrained(str(self.directory), backend="pil")
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.directory}: {' / '.join(PROCESSOR_FILES)} is not a usable image processor ({err})") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.directory))
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"{self.directory}: no usable tokenizer files ({err})") from None
        self.max_text_length = int(max_text_length)

    def encode(self, texts):
        encoded = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.max_text_length, return_tensors="pt",
            return_token_type_ids=False,
        )
        return encoded["input_ids"].long(), encoded["attention_mask"].long()

    def count_tokens(self, text):
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def image_array(self, image):
        return rgb(image)

    def pixels(self, images):
        out = self.image_processor(images=list(images), return_tensors="pt")
        return {"pixel_values": out["pixel_values"].float(), "pixel_mask": out["pixel_mask"].long()}

    def files(self):
        return [self.directory / name for name in (*PROCESSOR_FILES, *HF_TOKENIZER_FILES) if (self.directory / name).is_file()]

    def describe(self):
        processor = self.image_processor
        return {
            "kind": self.kind,
            "resize": "shortest_edge",
            "size": dict(processor.size) if processor.size else None,
            "size_divisor": getattr(processor, "size_divisor", None),
            "image_mean": list(processor.image_mean),
            "image_std": list(processor.image_std),
            "tokenizer": type(self.tokenizer).__name__,
            "max_text_length": self.max_text_length,
        }


def is_checkpoint_processor(directory: str | Path) -> bool:
    """The directory holds a Hugging Face image processor config (a ``ViltProcessor`` was saved there)."""
    return any((Path(directory) / name).is_file() for name in PROCESSOR_FILES)


def load_preprocessor(directory: str | Path, max_text_length: int | None = None) -> Preprocessor:
    """The pre-processing of the model saved in ``directory`` (a teacher, a student, a registered model's files).

    ``max_text_length`` defaults to the model's ``max_position_embeddings`` (``config.json``); a
    model of ours may also record the question length it trained with (``benchmark.json``).
    """
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (not a saved model directory)")
    config = json.loads(config_file.read_text())
    length = max_text_length or int(config.get("max_position_embeddings", 40))
    if is_checkpoint_processor(directory):
        return CheckpointProcessor(directory, length)
    if not (directory / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(
            f"{directory}: no {' or '.join(PROCESSOR_FILES)} (a Hugging Face checkpoint's processor) and no {TOKENIZER_FILE}"
            " (a model of ours)"
        )
    benchmark = directory / "benchmark.json"
    if max_text_length is None and benchmark.is_file():
        length = int(json.loads(benchmark.read_text()).get("max_question_length", length))
    return WordLevelSquare(directory / TOKENIZER_FILE, int(config["image_size"]), length)
