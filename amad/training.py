"""Plain-torch training helpers shared by the teacher job and distillation workers.

Nothing here knows about Ray or MLflow: the jobs in ``pipeline/`` call these and report.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import nn

from amad.data.dataset import VQASplit


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> float:
    """Learning-rate factor: linear warm-up to 1 over ``warmup_steps``, then cosine to ``min_factor``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases, norms and embeddings (the usual transformer recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.ndim >= 2 and "embeddings" not in name
        (decay if is_matrix else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))


def accuracy_report(predictions: torch.Tensor, split: VQASplit) -> dict[str, float]:
    """Accuracy overall, per question type (``acc/<type>``), relational and non-relational.

    ``predictions`` ``(N,)`` long answer indices for every question of ``split``, in order.
    ``accuracy`` is exact match with the split's label; a split with human answers (VQA-v2) also
    gets VQA's soft accuracy, ``vqa_accuracy`` and ``vqa_acc/<type>`` (its types are VQA's
    ``answer_type``). Relational/non-relational figures are the mean over questions of those types.
    """
    correct = (predictions == split.labels).float()
    soft = split.human_answers.accuracy(predictions) if split.human_answers is not None else None
    report = {"accuracy": correct.mean().item()}
    if soft is not None:
        report["vqa_accuracy"] = soft.mean().item()
    relational = torch.zeros_like(correct, dtype=torch.bool)
    for index, name in enumerate(split.qtypes):
        chosen = split.qtype == index
        if chosen.any():
            report[f"acc/{name}"] = correct[chosen].mean().item()
            if soft is not None:
                report[f"vqa_acc/{name}"] = soft[chosen].mean().item()
        if name in split.relational_qtypes:
            relational |= chosen
    if split.relational_qtypes:
        report["relational_accuracy"] = correct[relational].mean().item() if relational.any() else float("nan")
        report["nonrelational_accuracy"] = correct[~relational].mean().item() if (~relational).any() else float("nan")
    return report


@torch.no_grad()
def predict(model: nn.Module, adapter, split: VQASplit, batch_size: int = 256, blank_images: bool = False) -> tuple[torch.Tensor, float]:
    """Argmax answers ``(N,)`` for every question in ``split`` and the mean cross-entropy."""
    was_training = model.training
    model.eval()
    predictions, total_loss = [], 0.0
    for batch in split.batches(batch_size):
        if blank_images:
            batch["pixel_values"] = torch.zeros_like(batch["pixel_values"])
        logits = adapter.forward(model, batch, need_attentions=False).logits
        total_loss += nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
        predictions.append(logits.argmax(dim=-1))
    model.train(was_training)
    return torch.cat(predictions), total_loss / max(1, len(split))


def evaluate(model: nn.Module, adapter, split: VQASplit, batch_size: int = 256, blank_images: bool = False) -> dict[str, float]:
    """``accuracy_report`` plus ``loss`` for a model on a split."""
    predictions, loss = predict(model, adapter, split, batch_size, blank_images)
    return {**accuracy_report(predictions, split), "loss": loss}


def answer_prior_predictions(train: VQASplit, split: VQASplit) -> torch.Tensor:
    """The most common training answer of each question type, predicted for every question of ``split``."""
    best = {}
    for index in range(len(train.qtypes)):
        answers = train.labels[train.qtype == index].tolist()
        best[index] = Counter(answers).most_common(1)[0][0] if answers else 0
    return torch.tensor([best[int(t)] for t in split.qtype], dtype=torch.long)
