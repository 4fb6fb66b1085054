"""What a distillation worker trains on and how it validates, per model family (imported by the workers only).

:mod:`pipeline.distill_worker` runs the same DDP loop for every family; a task object supplies what
differs: the training examples (``len`` and ``batch(indices)``), which batch key the task loss reads,
the validation over the whole split (each worker evaluates its shard; the figures are combined), the
files a checkpoint carries besides the weights, and the student before its first step.

- :class:`VqaTask` (``vilt``): questions from the generated benchmark or VQA-v2 files through the
  teacher's pre-processing; validation accuracy (per type, relational, VQA soft accuracy).
- :class:`CaptionTask` (``ved``): (image, reference) pairs of the generated captions; validation decodes a
  greedy caption for every validation image (each worker its shard), gathers them and scores them once
  with :func:`amad.metrics.caption_scores` (``val_cider_d``, ``val_bleu_4``) and the teacher-forced
  token cross-entropy (``val_loss``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from amad.models import StudentSpec
from pipeline import names
from pipeline.config import DistillJobConfig


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(values, op=op)
    return values


def _all_gather(value) -> list:
    """Every worker's ``value`` (any picklable object), in rank order."""
    if not _distributed():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


class VqaTask:
    """Visual question answering (ViLT): the questions of the job's data source, one answer label each."""

    family = "vilt"

    def __init__(self, cfg: DistillJobConfig, teacher_path: Path, data: dict):
        from amad.data.preprocess import load_preprocessor
        from amad.data.sources import load_split, model_labels, source_from_dict

        self.data = data
        source = source_from_dict(data)
        self.preprocessor = load_preprocessor(teacher_path)
        labels = model_labels(teacher_path)
        (self.train, _), (self.val, _) = (load_split(source, split, self.preprocessor, labels) for split in ("train", "val"))
        self.target_key = "soft_targets" if cfg.objective.task_loss == "vqa_bce" else "labels"

    @torch.no_grad()
    def validate(self, model: nn.Module, adapter, rank: int, world: int, batch_size: int, device: torch.device) -> dict[str, float]:
        """Accuracy and mean cross-entropy over the WHOLE validation split: each worker evaluates every
        ``world``-th question from ``rank`` and the counts are summed across workers.

        Runs in fp32 on the unwrapped model (no DDP collectives per batch, and the figures are the ones
        ``amad.training.evaluate`` gives for the saved student).
        """
        split = self.val
        qtypes = len(split.qtypes)
        shard = split.subset(torch.arange(rank, len(split), world))
        loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
        soft_sum = torch.zeros(1, dtype=torch.float64, device=device)  # VQA accuracy, where the split has human answers
        correct = torch.zeros(qtypes, dtype=torch.float64, device=device)  # per question type
        count = torch.zeros(qtypes, dtype=torch.float64, device=device)
        was_training = model.training
        model.eval()
        done = 0
        for batch in shard.batches(batch_size):
            batch = _to(batch, device)
            logits = adapter.forward(model, batch, need_attentions=False).logits.float()  # (B, answers)
            loss_sum += nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").double()
            predicted = logits.argmax(dim=-1)
            hit = predicted == batch["labels"]
            correct += torch.bincount(batch["qtype"][hit], minlength=qtypes).double()
            count += torch.bincount(batch["qtype"], minlength=qtypes).double()
            if shard.human_answers is not None:
                rows = torch.arange(done, done + len(predicted))
                soft_sum += shard.human_answers[rows].accuracy(predicted.cpu()).sum().double().to(device)
            done += len(predicted)
        model.train(was_training)
        totals = _all_reduce(torch.cat([loss_sum, soft_sum, correct, count]))
        loss_sum, soft_sum, correct, count = totals[0], totals[1], totals[2 : 2 + qtypes], totals[2 + qtypes :]
        relational = torch.tensor([name in split.relational_qtypes for name in split.qtypes], device=device)
        metrics = {names.VAL_ACCURACY: (correct.sum() / count.sum()).item(), names.VAL_LOSS: (loss_sum / count.sum()).item()}
        if relational.any():  # the generated benchmark's relational questions; VQA-v2 has no such type
            metrics[names.VAL_RELATIONAL_ACCURACY] = (correct[relational].sum() / count[relational].sum().clamp(min=1)).item()
        if split.human_answers is not None:
            metrics[names.VAL_VQA_ACCURACY] = (soft_sum / count.sum()).item()
        return metrics

    def write_files(self, directory: Path) -> None:
        """The teacher's pre-processing files and the data source, beside the student's weights."""
        self.preprocessor.save(directory)
        (directory / names.BENCHMARK_FILE).write_text(json.dumps(self.data, indent=2))

    @staticmethod
    def new_student(cfg: DistillJobConfig, adapter, teacher: nn.Module, importance: dict | None) -> nn.Module:
        """The student before its first step: random, regrouped from the teacher, or pruned from it."""
        if cfg.student.init == "pruned":
            from amad.pruning import Importance, plan, prune_from_plan

            if importance is None:
                raise ValueError("student.init=pruned but no teacher importance reached the worker (the driver computes it)")
            kept = plan(Importance.from_dict(importance), cfg.student.heads, cfg.student.layers, cfg.student.ffn_keep)
            return prune_from_plan(teacher, kept)
        spec = StudentSpec(cfg.student.heads, cfg.student.layers, cfg.student.resolved_head_dim(), cfg.student.intermediate_ratio)
        student = adapter.build(adapter.student_config(teacher.config, spec), seed=cfg.seed)
        if cfg.student.init == "teacher":
            adapter.init_from_teacher(student, teacher)
        return student

    @staticmethod
    def origins(student: nn.Module):
        from amad.pruning import recorded_origins

        return recorded_origins(student)


class CaptionTask:
    """Image captioning (VisionEncoderDecoder): every (image, reference caption) pair of the generated captions."""

    family = "ved"
    target_key = "labels"  # token ids, -100 on padding

    def __init__(self, cfg: DistillJobConfig, teacher_path: Path, data: dict):
        from amad.data.captions import caption_training_set, make_caption_split
        from amad.data.sources import source_from_dict
        from amad.data.text import load_tokenizer

        self.spec = source_from_dict(data)
        self.tokenizer = load_tokenizer(teacher_path)
        self.train = caption_training_set(make_caption_split(self.spec, "train"), self.tokenizer, self.spec.max_caption_length)
        self.val = make_caption_split(self.spec, "val")  # images and references: decoded and scored
        self.val_pairs = caption_training_set(self.val, self.tokenizer, self.spec.max_caption_length)  # the teacher-forced loss

    @torch.no_grad()
    def validate(self, model: nn.Module, adapter, rank: int, world: int, batch_size: int, device: torch.device) -> dict[str, float]:
        """CIDEr-D and BLEU-4 of greedy captions of EVERY validation image, and the token cross-entropy of every
        reference: each worker decodes every ``world``-th image from ``rank`` and scores every ``world``-th pair;
        the captions are gathered and scored once (the same figures on every worker)."""
        from amad.data.captions import decode_caption
        from amad.data.images import pixels_from_uint8
        from amad.metrics import caption_scores

        was_training = model.training
        model.eval()
        rows = list(range(rank, len(self.val), world))
        captions = []
        for start in range(0, len(rows), batch_size):
            pixels = pixels_from_uint8(self.val.images[rows[start:start + batch_size]]).to(device)
            generated = adapter.generate(model, pixels, max_length=self.spec.max_caption_length)
            captions += [decode_caption(self.tokenizer, row) for row in generated.tolist()]
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed cross-entropy, tokens
        for batch in self.val_pairs.subset(torch.arange(rank, len(self.val_pairs), world)).batches(batch_size):
            batch = _to(batch, device)
            logits = adapter.forward(model, batch, need_attentions=False).logits.float()  # (B, T, V)
            labels = batch["labels"]
            totals[0] += nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").double()
            totals[1] += (labels != -100).sum().double()
        model.train(was_training)
        totals = _all_reduce(totals)
        candidates = {self.val.image_ids[row]: caption for part in _all_gather(list(zip(rows, captions))) for row, caption in part}
        scores = caption_scores(self.val.reference_map(), candidates)
        return {names.VAL_CIDER_D: scores["cider_d"], names.VAL_BLEU_4: scores["bleu_4"],
                names.VAL_LOSS: (totals[0] / totals[1].clamp(min=1)).item()}

    def write_files(self, directory: Path) -> None:
        """The tokenizer and the captions spec (as `amad teacher` writes them beside a captioner)."""
        from amad.data.text import save_tokenizer

        save_tokenizer(self.tokenizer, directory)
        (directory / CAPTIONS_FILE).write_text(json.dumps(self.spec.to_dict(), indent=2))

    @staticmethod
    def new_student(cfg: DistillJobConfig, adapter, teacher: nn.Module, importance: dict | None) -> nn.Module:
        """A random captioner of the student's shape, or the teacher pruned per kind of head (:mod:`amad.pruning_ved`)."""
        if cfg.student.init == "pruned":
            from amad.pruning_ved import VedImportance, plan, prune_from_plan

            if importance is None:
                raise ValueError("student.init=pruned but no teacher importance reached the worker (the driver computes it)")
            return prune_from_plan(teacher, plan(VedImportance.from_dict(importance), cfg.student.heads, cfg.student.layers, cfg.student.ffn_keep))
        spec = StudentSpec(cfg.student.heads, cfg.student.layers, cfg.student.resolved_head_dim(), cfg.student.intermediate_ratio)
        return adapter.build(adapter.student_config(teacher.config, spec), seed=cfg.seed)

    @staticmethod
    def origins(student: nn.Module):
        from amad.pruning_ved import recorded_origins

        return recorded_origins(student)


CAPTIONS_FILE = "captions.json"  # as pipeline.train_captioner.CAPTIONS_FILE (that module imports the Ray-free teacher job)
TASKS = {VqaTask.family: VqaTask, CaptionTask.family: CaptionTask}


def task_for(family: str, cfg: DistillJobConfig, teacher_path: Path, data: dict):
    """The task of a teacher's family, with its data loaded."""
    return TASKS[family](cfg, teacher_path, data)
