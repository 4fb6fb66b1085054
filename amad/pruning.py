"""Students that start from the teacher: score its heads and FFN neurons, keep the best, drop layers.

Head importance follows Michel, Levy & Neubig, "Are Sixteen Heads Really Better than One?"
(NeurIPS 2019, Sec. 4): a gate ``xi_h`` (= 1) multiplies each head's context vector, and

    I_h = E_x | dL(x) / d xi_h |                                           (Michel et al., Eq. 2)

with ``L`` the model's own task loss on training examples; scores are then l2-normalised within
each layer (their Sec. 4.1). transformers 5.x removed ``head_mask`` and ``prune_heads``, so the gate
is a forward hook on each self-attention module's context ``(B, T, heads * head_dim)``; a gate of 0
is exactly pruning that head (tested).

FFN neurons are ranked by their mean activation magnitude over the training tokens (Minitron,
Muralidharan et al. 2024, Sec. 2.2 "activation-based importance"), computed in the same pass.

:func:`prune` then builds a *smaller* model: it slices the query/key/value rows and the attention
output's columns of the kept heads (head size and residual width unchanged), drops layers and
narrows each FFN. The result records where everything came from in its config (``amad_pruning``:
the teacher layer of each student layer and the teacher head of each student head), so it saves,
loads, exports and serves like any other checkpoint (:class:`amad.models.AmadViltForQuestionAnswering`
rebuilds the shapes from that record).

Module names here are ViLT's (BERT-style layers: ``attention.attention.{query,key,value}``,
``attention.output.dense``, ``intermediate.dense``, ``output.dense``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amad.models import PRUNING_KEY, AmadViltForQuestionAnswering, head_counts
from amad.objective import resolve_layer_map

__all__ = ["Importance", "PruningPlan", "score", "head_importance", "plan", "prune", "prune_from_plan", "origins", "recorded_origins", "parameter_count"]


@dataclass(frozen=True)
class Importance:
    """Scores of a teacher's parts: ``heads (layers, heads)`` (Michel, l2-normalised per layer) and
    ``ffn (layers, intermediate_size)`` (mean |activation|), over ``examples`` training questions."""

    heads: Tensor
    ffn: Tensor
    examples: int

    def to_dict(self) -> dict:
        return {"heads": self.heads.tolist(), "ffn": self.ffn.tolist(), "examples": self.examples}

    @staticmethod
    def from_dict(values: dict) -> "Importance":
        return Importance(torch.tensor(values["heads"]), torch.tensor(values["ffn"]), int(values["examples"]))


def score(model: AmadViltForQuestionAnswering, batches: Iterable[dict[str, Tensor]]) -> Importance:
    """Head importance (Michel et al. Eq. 2) and FFN neuron importance in one pass over ``batches``.

    ``batches``: dicts as :mod:`amad.data.dataset` makes them (``labels`` needed). The model's
    parameters get no gradient (only the gates do) and its training mode is restored afterwards.
    Returns scores on the CPU.
    """
    if getattr(model.config, PRUNING_KEY, None):
        raise ValueError("score() takes an unpruned model: this one already carries a pruning record")
    layers = list(model.vilt.encoder.layer)
    heads = model.config.num_attention_heads
    head_dim = model.config.hidden_size // heads
    device = next(model.parameters()).device
    head_sum = torch.zeros(len(layers), heads, dtype=torch.float64)
    ffn_sum = torch.zeros(len(layers), model.config.intermediate_size, dtype=torch.float64)
    tokens_seen = 0
    examples = 0
    gates: list[Tensor] = []
    token_mask: list[Tensor] = []  # (B, T) of the batch in flight, to average activations over real tokens

    def gate_context(_module, _inputs, output, index: int):
        context = output[0]  # (B, T, heads * head_dim)
        batch, tokens, _ = context.shape
        gated = context.view(batch, tokens, heads, head_dim) * gates[index][:, None, :, None]
        return (gated.view(batch, tokens, heads * head_dim), *output[1:])

    def record_ffn(_module, _inputs, output, index: int):
        mask = token_mask[0].to(output.dtype)  # (B, T)
        ffn_sum[index] += (output.detach().abs() * mask[..., None]).sum(dim=(0, 1)).double().cpu()

    def record_tokens(_module, _inputs, output):
        # the embeddings' token mask (text, image CLS, patches; padding text and padding patches 0)
        token_mask[:] = [output[1].bool()]

    handles = [model.vilt.embeddings.register_forward_hook(record_tokens)]
    for index, layer in enumerate(layers):
        handles.append(layer.attention.attention.register_forward_hook(lambda m, i, o, index=index: gate_context(m, i, o, index)))
        handles.append(layer.intermediate.register_forward_hook(lambda m, i, o, index=index: record_ffn(m, i, o, index)))
    was_training = model.training
    requires_grad = [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            size = batch["labels"].shape[0]
            gates[:] = [torch.ones(size, heads, device=device, requires_grad=True) for _ in layers]  # (B, H) per layer
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                           pixel_mask=batch.get("pixel_mask"), return_dict=True).logits
            # summed, not averaged: the gradient of each example's loss lands on that example's gates
            loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
            grads = torch.autograd.grad(loss, gates, allow_unused=True)
            missing = [index for index, grad in enumerate(grads) if grad is None]
            if missing:  # the hook's output did not reach the logits: heads cannot be scored this way
                raise ValueError(
                    f"cannot score the teacher's heads: the self-attention output of layer(s) {missing} does not reach the "
                    f"logits through the gate hooked on {type(layers[missing[0]].attention.attention).__name__} "
                    f"(attention implementation {getattr(model.config, '_attn_implementation', None)!r}); "
                    "the teacher must be a ViLT whose attention modules return their context"
                )
            head_sum += torch.stack([g.abs().sum(dim=0) for g in grads]).double().cpu()
            tokens_seen += int(token_mask[0].sum())
            examples += size
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
        for parameter, flag in zip(model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
    if examples == 0:
        raise ValueError("score() got no batches: importance needs training examples")
    head_scores = head_sum / examples
    head_scores = head_scores / head_scores.norm(dim=1, keepdim=True).clamp(min=1e-20)  # l2 per layer (Michel Sec. 4.1)
    return Importance(head_scores.float(), (ffn_sum / tokens_seen).float(), examples)


def head_importance(model: AmadViltForQuestionAnswering, batches: Iterable[dict[str, Tensor]]) -> Tensor:
    """Michel et al.'s head importance ``(layers, heads)``, l2-normalised within each layer."""
    return score(model, batches).heads


@dataclass(frozen=True)
class PruningPlan:
    """What a pruned student keeps of its teacher, by teacher index (all lists sorted ascending).

    ``teacher_layers[i]`` is the teacher layer student layer ``i`` starts from; ``heads[i]`` the
    teacher heads it keeps; ``neurons[i]`` the FFN neurons it keeps.
    """

    teacher_layers: list[int]
    heads: list[list[int]]
    neurons: list[list[int]]


def plan(
    importance: Importance,
    heads: int,
    layers: int | list[int],
    ffn_keep: float = 1.0,
) -> PruningPlan:
    """The ``heads`` most important heads and the ``ffn_keep`` most active FFN neurons of each kept layer.

    ``layers``: how many teacher layers to keep, chosen by the ``uniform`` layer map (TinyBERT, as in
    :func:`amad.objective.resolve_layer_map`: evenly spaced, ending at the last layer), or the
    teacher layer indices themselves. ValueError names the setting that cannot be met.
    """
    teacher_layers, teacher_heads = importance.heads.shape
    width = importance.ffn.shape[1]
    if not 1 <= heads <= teacher_heads:
        raise ValueError(f"student.heads={heads}: a pruned student keeps 1 to {teacher_heads} of the teacher's heads per layer")
    if not 0 < ffn_keep <= 1:
        raise ValueError(f"student.ffn_keep={ffn_keep}: the fraction of FFN neurons kept must be in (0, 1]")
    if isinstance(layers, int):
        if not 1 <= layers <= teacher_layers:
            raise ValueError(f"student.layers={layers}: a pruned student keeps 1 to {teacher_layers} of the teacher's layers")
        kept_layers = [t for _, t in resolve_layer_map("uniform", teacher_layers, layers)]
    else:
        kept_layers = sorted(int(t) for t in layers)
        if not kept_layers or len(set(kept_layers)) != len(kept_layers) or not all(0 <= t < teacher_layers for t in kept_layers):
            raise ValueError(f"student.teacher_layers={list(layers)}: need distinct teacher layers in [0, {teacher_layers})")
    neurons = max(1, round(ffn_keep * width))
    return PruningPlan(
        teacher_layers=kept_layers,
        heads=[sorted(importance.heads[t].topk(heads).indices.tolist()) for t in kept_layers],
        neurons=[sorted(importance.ffn[t].topk(neurons).indices.tolist()) for t in kept_layers],
    )


def prune(
    model: AmadViltForQuestionAnswering,
    keep_heads: dict[int, list[int]],
    keep_layers: list[int] | None = None,
    ffn_keep: float | None = None,
    ffn_scores: Tensor | None = None,
) -> AmadViltForQuestionAnswering:
    """A new, smaller model made of ``model``'s weights; ``model`` itself is left untouched.

    Args:
        keep_heads: teacher layer -> the heads it keeps (a kept layer missing here keeps all).
        keep_layers: teacher layers to keep, in order (default: all).
        ffn_keep: fraction of each kept FFN's neurons to keep, the most important by ``ffn_scores``
            ``(layers, intermediate_size)`` (required when ``ffn_keep < 1``).

    Returns a model with fewer parameters and FLOPs whose config records the pruning.
    """
    config = model.config
    keep_layers = list(range(config.num_hidden_layers)) if keep_layers is None else list(keep_layers)
    width = config.intermediate_size
    if ffn_keep is not None and ffn_keep < 1:
        if ffn_scores is None:
            raise ValueError("ffn_keep < 1 needs ffn_scores (layers, intermediate_size) to choose the neurons")
        count = max(1, round(ffn_keep * width))
        neurons = [sorted(ffn_scores[t].topk(count).indices.tolist()) for t in keep_layers]
    else:
        neurons = [list(range(width)) for _ in keep_layers]
    heads = [sorted(keep_heads.get(t, range(config.num_attention_heads))) for t in keep_layers]
    return prune_from_plan(model, PruningPlan(keep_layers, heads, neurons))


def prune_from_plan(model: AmadViltForQuestionAnswering, kept: PruningPlan) -> AmadViltForQuestionAnswering:
    """:func:`prune` with every choice made: build the pruned shapes from the config, copy the slices."""
    config = model.config
    if getattr(config, PRUNING_KEY, None):
        raise ValueError("prune() takes an unpruned model: this one already carries a pruning record")
    head_dim = config.hidden_size // config.num_attention_heads
    values = config.to_dict()
    for key in ("architectures", "transformers_version", "model_type", "_name_or_path"):
        values.pop(key, None)
    values.update(num_hidden_layers=len(kept.teacher_layers))
    values[PRUNING_KEY] = {
        "teacher_layers": list(kept.teacher_layers),
        "heads": [list(h) for h in kept.heads],
        "intermediate_sizes": [len(n) for n in kept.neurons],
    }
    pruned_config = type(config)(**values)
    pruned_config._attn_implementation = "eager"
    pruned = AmadViltForQuestionAnswering(pruned_config)  # raises on a bad record (heads out of range, ...)

    source = model.state_dict()
    target = {}
    prefix = "vilt.encoder.layer."
    for name, tensor in pruned.state_dict().items():
        if not name.startswith(prefix):
            target[name] = source[name].clone()
            continue
        index, rest = name[len(prefix):].split(".", 1)
        student_layer = int(index)
        teacher_name = f"{prefix}{kept.teacher_layers[student_layer]}.{rest}"
        rows = _head_rows(kept.heads[student_layer], head_dim)
        target[name] = _slice(rest, source[teacher_name], rows, torch.tensor(kept.neurons[student_layer]))
        if target[name].shape != tensor.shape:  # a bug here, not a user error: fail loudly
            raise RuntimeError(f"pruned {name}: got {tuple(target[name].shape)}, expected {tuple(tensor.shape)}")
    pruned.load_state_dict(target)
    return pruned.to(next(model.parameters()).device).train(model.training)


def _head_rows(heads: list[int], head_dim: int) -> Tensor:
    """The rows of a ``(heads * head_dim, hidden)`` projection that belong to ``heads``."""
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def _slice(name: str, tensor: Tensor, rows: Tensor, neurons: Tensor) -> Tensor:
    """One encoder-layer parameter cut to the kept heads (``rows``) and FFN ``neurons``."""
    if name.startswith("attention.attention.") and name.split(".")[2] in ("query", "key", "value"):
        return tensor[rows].clone()  # weight (out, in) rows / bias (out,)
    if name == "attention.output.dense.weight":
        return tensor[:, rows].clone()  # (hidden, heads * head_dim) columns
    if name.startswith("intermediate.dense."):
        return tensor[neurons].clone()
    if name == "output.dense.weight":
        return tensor[:, neurons].clone()
    return tensor.clone()  # LayerNorms, the attention output and FFN output biases


def origins(model: nn.Module) -> list[list[tuple[int, int]]]:
    """For each student layer, the teacher ``(layer, head)`` each of its heads came from.

    An unpruned model's heads are their own origin (layer ``l``, head ``h``).
    """
    config = model.config
    pruning = getattr(config, PRUNING_KEY, None)
    if not pruning:
        return [[(layer, h) for h in range(count)] for layer, count in enumerate(head_counts(config))]
    return [[(t, h) for h in heads] for t, heads in zip(pruning["teacher_layers"], pruning["heads"])]


def recorded_origins(model: nn.Module) -> list[list[tuple[int, int]]]:
    """:func:`origins` of a model that was pruned from a teacher; ValueError for any other.

    One-to-one by origin (:class:`amad.objective.DistillationObjective`) needs the record: for a
    student built from scratch or regrouped from the teacher, "the teacher head it came from" does
    not exist, and guessing it (head ``k`` from head ``k``) would silently be one-to-one by index.
    """
    if not getattr(model.config, PRUNING_KEY, None):
        raise ValueError(
            "this student has no recorded origin: one-to-one by origin needs a student pruned from the "
            f"teacher (student.init: pruned), whose config carries {PRUNING_KEY!r}; use "
            "one_to_one_pairing: index for other students"
        )
    return origins(model)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

