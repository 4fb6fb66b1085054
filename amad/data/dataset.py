"""A VQA split as tensors, and the batches every model in this project consumes.

A batch is a dict:
    input_ids       (B, L) long    question tokens, ``[CLS] ... [SEP] [PAD]...``
    attention_mask  (B, L) long    1 for real tokens
    pixel_values    (B, 3, S, S)   float32 in [-1, 1]
    labels          (B,) long      answer index into ``answers``
    qtype           (B,) long      question-type index into ``qtypes`` (for per-type accuracy)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from amad.data.images import pixels_from_uint8


@dataclass
class VQASplit:
    """Encoded questions over a shared image store.

    ``images`` is either ``(N_img, S, S, 3)`` uint8 in memory, or a callable ``index -> (S, S, 3)``
    uint8 that loads lazily (real data sets on disk).
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

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _images_for(self, image_index: torch.Tensor) -> np.ndarray:
        if isinstance(self.images, np.ndarray):
            return self.images[image_index.numpy()]
        return np.stack([self.images(int(i)) for i in image_index])

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of the questions at ``indices`` ``(B,)``."""
        return {
            "input_ids": self.input_ids[indices],
            "attention_mask": self.attention_mask[indices],
            "pixel_values": pixels_from_uint8(self._images_for(self.image_index[indices])),
            "labels": self.labels[indices],
            "qtype": self.qtype[indices],
        }

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
