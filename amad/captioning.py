"""Captioning evaluation: decode captions for a split's images and score them (plain torch, no Ray or MLflow).

Greedy (``num_beams=1``) or beam search through :meth:`amad.models_ved.VedAdapter.generate`; the scores
are :func:`amad.metrics.caption_scores` against the split's references (BLEU-1..4, ROUGE-L, CIDEr-D).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer
from torch import nn

from amad.data.captions import CaptionSplit, CaptionTrainingSet, decode_caption
from amad.data.images import pixels_from_uint8
from amad.metrics import caption_scores
from amad.models_ved import VedAdapter


@torch.no_grad()
def generate_captions(model: nn.Module, split: CaptionSplit, tokenizer: Tokenizer, *, max_length: int, num_beams: int = 1,
                      batch_size: int = 128, blank_images: bool = False) -> list[str]:
    """One caption per image of ``split``, in order (``blank_images``: every pixel 0, for the text-only baseline)."""
    was_training = model.training
    model.eval()
    captions = []
    for start in range(0, len(split), batch_size):
        pixels = pixels_from_uint8(split.images[start:start + batch_size])
        if blank_images:
            pixels = torch.zeros_like(pixels)
        for row in VedAdapter.generate(model, pixels, max_length=max_length, num_beams=num_beams).tolist():
            captions.append(decode_caption(tokenizer, row))
    model.train(was_training)
    return captions


@torch.no_grad()
def teacher_forced_loss(model: nn.Module, data: CaptionTrainingSet, batch_size: int = 256, blank_images: bool = False) -> float:
    """Mean token cross-entropy of the references under teacher forcing."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for batch in data.batches(batch_size):
        if blank_images:
            batch["pixel_values"] = torch.zeros_like(batch["pixel_values"])
        logits = VedAdapter.forward(model, batch, need_attentions=False).logits
        labels = batch["labels"]
        total += nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").item()
        tokens += int((labels != -100).sum())
    model.train(was_training)
    return total / max(1, tokens)


def caption_report(model: nn.Module, split: CaptionSplit, tokenizer: Tokenizer, *, max_length: int, num_beams: int = 1,
                   batch_size: int = 128, blank_images: bool = False, examples: int = 3) -> dict:
    """Scores of the decoded captions of ``split`` (``bleu_1`` ... ``cider_d``) and a few ``examples`` (caption, references)."""
    captions = generate_captions(model, split, tokenizer, max_length=max_length, num_beams=num_beams, batch_size=batch_size,
                                 blank_images=blank_images)
    report = caption_scores(split.reference_map(), dict(zip(split.image_ids, captions)))
    report["examples"] = [{"image_id": split.image_ids[i], "caption": captions[i], "references": split.references[i]}
                          for i in range(min(examples, len(split)))]
    return report
