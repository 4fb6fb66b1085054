"""Train several students against one teacher in lockstep: one teacher forward per step, shared.

Used by the benchmarks that compare students under the same budget (``compare_methods.py``,
``compare_captioning.py``, ``pruning_frontier.py``): every student sees the same batches in the same order, and the teacher's
forward (the dominant cost of an AMAD step) is paid once per step instead of once per student.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from amad.models import ViltAdapter
from amad.objective import DistillationObjective
from amad.training import make_optimizer, warmup_cosine


def _needs_maps(objective: DistillationObjective) -> bool:
    return objective.method not in ("none", "relation")


def train_lockstep(
    teacher: nn.Module,
    students: dict[str, nn.Module],
    objectives: dict[str, DistillationObjective],
    train,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    seed: int,
    weight_decay: float = 0.01,
    every: int = 0,
    on_step: Callable[[int, dict[str, nn.Module]], None] | None = None,
    adapter=ViltAdapter,
    stop_at: int | None = None,
) -> dict[str, nn.Module]:
    """Train ``students[name]`` on ``objectives[name]`` for ``steps`` AdamW steps (warm-up + cosine to
    0.1 lr, gradient clip 1.0); returns them in eval mode. No dropout is assumed (the presets' rates
    are 0), so no random stream is shared between the students.

    ``on_step(step, students)`` is called after every ``every``-th step and after the last (for
    learning curves); the students are in eval mode during the call and back in training mode after.
    ``adapter``: the model family's (:class:`amad.models_ved.VedAdapter` for captioners; ``train`` then
    yields caption batches, whose ``labels`` are token ids). ``stop_at``: stop after that many steps of the
    ``steps``-step schedule (the same students as a full run's, up to that step; ``on_step`` is called there too).
    """
    students = {name: student.train() for name, student in students.items()}
    optimizers = {name: make_optimizer(student, lr, weight_decay) for name, student in students.items()}
    teacher_maps = any(o.needs_teacher and _needs_maps(o) for o in objectives.values())
    teacher_qkv = any(o.needs_teacher and o.method == "relation" for o in objectives.values())
    needs_teacher = any(o.needs_teacher for o in objectives.values())
    generator = torch.Generator().manual_seed(seed)
    last = steps if stop_at is None else min(steps, stop_at)
    step = 0
    while step < last:
        for batch in train.batches(batch_size, shuffle=True, generator=generator, drop_last=True):
            if step >= last:
                break
            factor = warmup_cosine(step, warmup, steps, 0.1)
            with torch.no_grad():
                t_out = adapter.forward(teacher, batch, need_attentions=teacher_maps, need_qkv=teacher_qkv) if needs_teacher else None
            for name, student in students.items():
                objective, optimizer = objectives[name], optimizers[name]
                for group in optimizer.param_groups:
                    group["lr"] = lr * factor
                s_out = adapter.forward(student, batch, need_attentions=_needs_maps(objective), need_qkv=objective.method == "relation")
                loss = objective(t_out if objective.needs_teacher else None, s_out, batch["labels"])["loss"]
                loss.backward()
                nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            if on_step is not None and ((every and step % every == 0) or step == last):
                on_step(step, {name: student.eval() for name, student in students.items()})
                for student in students.values():
                    student.train()
    return {name: student.eval() for name, student in students.items()}
