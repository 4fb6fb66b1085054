"""The one structure that crosses the model/loss boundary.

A model adapter (``amad.models``) turns a forward pass into :class:`VLOutputs`; the losses and the
:class:`~amad.objective.DistillationObjective` read only this, so a new model family plugs in by
returning the same shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class QKV:
    """Per-layer projections for relation distillation (MiniLMv2).

    ``query``, ``key``, ``value``: ``(B, T, hidden)`` each, before the split into heads.
    """

    query: Tensor
    key: Tensor
    value: Tensor


@dataclass
class VLOutputs:
    """What one forward pass of a vision-language model exposes to distillation.

    Attributes:
        logits: ``(B, num_labels)`` answer logits, or ``(B, T, vocab)`` per token (a decoder's).
        attentions: attention kind (``"self"``, ``"cross"``, ...) -> one tensor per layer, each
            ``(B, H, Q, K)`` of probabilities (rows sum to 1 over ``K``).
        query_masks: kind -> ``(B, Q)`` bool, True for real query rows (padding is False).
        key_masks: kind -> ``(B, K)`` bool, True for real keys.
        qkv: kind -> one :class:`QKV` per layer; empty unless the caller asked for it.
        logit_mask: ``(B, T)`` bool, True for real tokens, with per-token logits (None otherwise).
    """

    logits: Tensor
    attentions: dict[str, list[Tensor]]
    query_masks: dict[str, Tensor]
    key_masks: dict[str, Tensor]
    qkv: dict[str, list[QKV]] = field(default_factory=dict)
    logit_mask: Tensor | None = None
