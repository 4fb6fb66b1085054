"""A VQA split as tensors, and the batches every model in this project consumes.

A batch is a dict:
    input_ids       (B, L) long    question tokens, ``[CLS] ... [SEP] [PAD]...``
    attention_mask  (B, L) long    1 for real tokens
    pixel_values    (B, 3, H, W)   float32 (``S x S`` in [-1, 1] for this project's own models)
    pixel_mask      (B, H, W) long only for splits pre-processed by a checkpoint's image processor
                                   (images of any size, padded per batch; 1 on real pixels)
    labels          (B,) long      answer index into ``answers``
    qtype           (B,) long      question-type index into ``qtypes`` (for per-type accuracy)
    soft_targets    (B, A) float   only for splits with human answers (VQA-v2): each answer's VQA
                                   score (ViLT's ``min(1, 0.3 * count)``), for ``task_loss: vqa_bce``
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from amad.data.images import pixels_from_uint8
from amad.data.vqa_eval import HumanAnswers


@dataclass
class VQASplit:
    """Encoded questions over a shared image store.

    ``images`` is either ``(N_img, S, S, 3)`` uint8 in memory, or a callable ``index -> (H, W, 3)``
    uint8 that loads lazily (real data sets on disk). ``pixels`` turns a batch's images into the
    model inputs (:meth:`amad.data.preprocess.Preprocessor.pixels`); by default ``x / 127.5 - 1``
    of same-sized images.

    ``human_answers`` (VQA-v2 files) records which answers the human annotators gave, for VQA's
    soft accuracy and ViLT's soft targets (:class:`amad.data.vqa_eval.HumanAnswers`).
    """

    images: np.ndarray | Callable[[int], np.ndarray]
    image_index: torch.Tensor  # (N,) long, the image each question is about
    input_ids: torch.Tensor  # (N, L) long
    attention_mask: torch.Tensor  # (N, L) long
    labels: torch.Tensor  # (N,) long
    qtype: torch.Tensor  # (N,) long
    answers: tuple[str, ...]
    qtypes: tuple[str, ...]
    relational_qtypes: tuple[str, ...] = ()
    pixels: Callable[[list[np.ndarray] | np.ndarray], dict[str, torch.Tensor]] | None = None
    human_answers: HumanAnswers | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _images_for(self, image_index: torch.Tensor) -> np.ndarray | list[np.ndarray]:
        if isinstance(self.images, np.ndarray):
            return self.images[image_index.numpy()]
        return [self.images(int(i)) for i in image_index]

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of the questions at ``indices`` ``(B,)``."""
        images = self._images_for(self.image_index[indices])
        if self.pixels is not None:
            image_inputs = self.pixels(images)
        else:
            image_inputs = {"pixel_values": pixels_from_uint8(images if isinstance(images, np.ndarray) else np.stack(images))}
        batch = {
            "input_ids": self.input_ids[indices],
            "attention_mask": self.attention_mask[indices],
            **image_inputs,
            "labels": self.labels[indices],
            "qtype": self.qtype[indices],
        }
        if self.human_answers is not None:
            batch["soft_targets"] = self.human_answers[indices].soft_targets(len(self.answers))
        return batch

    def subset(self, indices: torch.Tensor) -> "VQASplit":
        """The questions at ``indices`` over the same image store (for sharding per worker)."""
        return VQASplit(
            self.images,
            self.image_index[indices],
            self.input_ids[indices],
            self.attention_mask[indices],
            self.labels[indices],
            self.qtype[indices],
            self.answers,
            self.qtypes,
            self.relational_qtypes,
            self.pixels,
            None if self.human_answers is None else self.human_answers[indices],
        )

    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None, drop_last: bool = False
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Iterate over the split in batches; ``shuffle`` uses ``generator`` for reproducible order."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        stop = len(self) - (len(self) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            yield self.batch(order[start : start + batch_size])

