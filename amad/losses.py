"""Attention-distillation losses: AMAD and the baselines it is compared with.

AMAD is from "No Head Left Behind – Multi-Head Alignment Distillation for Transformers" (AAAI 2024).
Every teacher head is matched against *all* student heads with a softmax over cosine similarities
(Eq. 2), and learns from the resulting mixture of student maps (Eq. 4–5 for the MSE form, Eq. 9 for
the KL form). That lets a student with fewer heads than its teacher still learn from every teacher
head, which the conventional one-to-one (MiniLM-style) loss cannot do.

Conventions shared by every function here:

* Attention maps are probabilities of shape ``(B, H, Q, K)``: rows sum to 1 over ``K``.
* ``query_mask`` is ``(B, Q)`` bool, True for real query rows. Masked rows take no part in anything:
  they are zeroed before similarities are formed and excluded from every mean, so what padding
  rows hold (even NaN) never matters.
* A "mean over valid rows" is taken per batch element (sum over valid rows / their count); a batch
  element with no valid row contributes 0.
* Losses are pure functions returning a 0-dim tensor. They compute in at least float32, so bf16 or
  fp16 maps from autocast do not lose the small probabilities the logs depend on.
* Bad input raises ``ValueError`` naming the argument and the shapes. Value checks cost a single
  host sync per call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from amad.outputs import QKV

__all__ = [
    "AMAD_VARIANTS",
    "align_weights",
    "amad_loss",
    "amad_loss_per_head",
    "head_mean_loss",
    "logit_kd_loss",
    "one_to_one_loss",
    "relation_loss",
]

AMAD_VARIANTS = ("kl", "mse")
_DEFAULT_EPS = 1e-8


# --------------------------------------------------------------------------------------------
# Validation and shared helpers
# --------------------------------------------------------------------------------------------


def _positive(name: str, value: float) -> float:
    value = float(value)
    # `not value > 0` also rejects NaN, which `value <= 0` would let through.
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number > 0; got {value}")
    return value


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_maps(teacher_attn: Tensor, student_attn: Tensor, query_mask: Tensor | None) -> None:
    """Shape checks only (no device sync)."""
    for name, t in (("teacher_attn", teacher_attn), ("student_attn", student_attn)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, Q, K); got shape {tuple(t.shape)}")
        if t.shape[1] < 1:
            raise ValueError(f"{name} has shape {tuple(t.shape)}: it needs at least one head")
    ts, ss = tuple(teacher_attn.shape), tuple(student_attn.shape)
    if ts[0] != ss[0]:
        raise ValueError(
            f"student_attn has shape {ss} but teacher_attn has {ts}: batch size must match"
        )
    if ts[2:] != ss[2:]:
        raise ValueError(
            f"student_attn has shape {ss} but teacher_attn has {ts}: Q and K must match"
        )
    if query_mask is not None:
        want = (ts[0], ts[2])
        if tuple(query_mask.shape) != want:
            raise ValueError(
                f"query_mask has shape {tuple(query_mask.shape)} but the attention maps "
                f"{ts} need (B, Q) = {want}"
            )
        if query_mask.dtype != torch.bool:
            raise ValueError(f"query_mask must be a bool tensor; got dtype {query_mask.dtype}")


def _prepare_maps(
    teacher_attn: Tensor, student_attn: Tensor, query_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate, upcast and zero masked rows.

    Returns ``(T, S, mask)``: ``T`` ``(B, Ht, Q, K)``, ``S`` ``(B, Hs, Q, K)``, ``mask`` ``(B, Q)``.
    """
    _check_maps(teacher_attn, student_attn, query_mask)
    dtype = _compute_dtype(teacher_attn, student_attn)
    B, _, Q, _ = teacher_attn.shape
    if query_mask is None:
        query_mask = torch.ones(B, Q, dtype=torch.bool, device=teacher_attn.device)
    rows = query_mask[:, None, :, None]
    # `where`, not multiplication: NaN * 0 is NaN, and padding rows may hold anything.
    T = torch.where(rows, teacher_attn.to(dtype), 0.0)
    S = torch.where(rows, student_attn.to(dtype), 0.0)
    # One sync for both maps; a NaN or negative entry would otherwise surface as a NaN loss
    # far from its cause.
    bad = torch.stack([(T.isnan() | (T < 0)).any(), (S.isnan() | (S < 0)).any()]).tolist()
    for name, given, is_bad in zip(
        ("teacher_attn", "student_attn"), (teacher_attn, student_attn), bad, strict=True
    ):
        if is_bad:
            raise ValueError(
                f"{name} (shape {tuple(given.shape)}) has NaN or negative entries in unmasked "
                "rows: attention maps must be probabilities"
            )
    return T, S, query_mask


def _kl_rows(p: Tensor, q: Tensor, eps: float) -> Tensor:
    """Row-wise KL(p || q) over the last dim; eps inside both logs keeps zeros' gradients finite."""
    return (p * (torch.log(p + eps) - torch.log(q + eps))).sum(-1)


def _masked_row_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` ``(B, ..., Q)`` over rows where ``mask`` ``(B, Q)`` is True -> ``(B, ...)``."""
    m = mask.reshape(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1])
    count = m.sum(-1).clamp_min(1).to(x.dtype)  # a batch element with no valid rows contributes 0
    # `where`: a padding row's value must not leak in even when it is inf or NaN.
    return torch.where(m, x, 0.0).sum(-1) / count


def _unit(x: Tensor, eps: float) -> Tensor:
    """``x`` ``(B, H, N)`` scaled to unit L2 norm along N.

    The norm is clamped at eps *before* the square root: an all-zero head (every row masked) gets
    a zero vector and a finite gradient instead of 0/0.
    """
    sq = x.pow(2).sum(-1, keepdim=True)
    return x / sq.clamp_min(eps * eps).sqrt()


def _alignment(
    T: Tensor, S: Tensor, temperature: float, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Paper Eq. 2 on prepared maps; the single implementation behind align_weights and amad_loss.

    Returns ``(a, t_unit, s_unit)``: ``a`` ``(B, Ht, Hs)``, unit vectors ``(B, H, Q*K)``.
    """
    t_unit = _unit(T.flatten(2), eps)
    s_unit = _unit(S.flatten(2), eps)
    # bmm over the flattened maps: the (B, Ht, Hs, Q, K) product never exists.
    w = torch.bmm(t_unit, s_unit.transpose(1, 2))
    return torch.softmax(w / temperature, dim=-1), t_unit, s_unit


# --------------------------------------------------------------------------------------------
# AMAD
# --------------------------------------------------------------------------------------------


def align_weights(
    teacher_attn: Tensor,
    student_attn: Tensor,
    query_mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """AMAD alignment weights ``a_ij`` (paper Eq. 2), for reports and plots.

    Each head's map, with masked rows zeroed, is flattened to a vector ``t_i`` / ``s_j`` of length
    ``Q*K``; ``w_ij = cos(t_i, s_j)`` and ``a_ij = softmax_j(w_ij / temperature)``.

    Args:
        teacher_attn: ``(B, Ht, Q, K)`` attention probabilities.
        student_attn: ``(B, Hs, Q, K)`` attention probabilities.
        query_mask: ``(B, Q)`` bool, True for real query rows; None means all rows are real.
        temperature: softmax temperature, > 0; smaller is closer to a hard argmax match.

    Returns:
        ``(B, Ht, Hs)``; each ``[b, i, :]`` sums to 1.
    """
    temperature = _positive("temperature", temperature)
    T, S, _ = _prepare_maps(teacher_attn, student_attn, query_mask)
    return _alignment(T, S, temperature, _DEFAULT_EPS)[0]


def amad_loss_per_head(
    teacher_attn: Tensor,
    student_attn: Tensor,
    query_mask: Tensor | None = None,
    *,
    variant: str = "kl",
    temperature: float = 1.0,
    eps: float = 1e-8,
    detach_weights: bool = False,
) -> Tensor:
    """AMAD loss of every teacher head before reduction.

    With ``a_ij`` from :func:`align_weights`:

    * ``variant="kl"`` (paper Eq. 9): the mixture ``M_i = sum_j a_ij S_j`` is again a distribution
      per row, and ``loss_i`` is the mean over valid query rows ``q`` of ``KL(T_i[q] || M_i[q])``.
    * ``variant="mse"`` (paper Eq. 4–5): ``loss_i = || t_i/||t_i|| - sum_j a_ij s_j/||s_j|| ||^2``
      over the flattened maps (masked rows zeroed), a value in ``[0, 4]``.

    Args:
        teacher_attn: ``(B, Ht, Q, K)`` attention probabilities.
        student_attn: ``(B, Hs, Q, K)`` attention probabilities; any ``Hs >= 1``.
        query_mask: ``(B, Q)`` bool, True for real query rows; None means all rows are real.
        variant: ``"kl"`` or ``"mse"``.
        temperature: alignment softmax temperature, > 0.
        eps: added inside logs and used as the floor of norms, > 0.
        detach_weights: if True, no gradient flows through ``a_ij``; only through the maps that
            the weights mix.

    Returns:
        ``(B, Ht)`` per-head losses.
    """
    if variant not in AMAD_VARIANTS:
        raise ValueError(f"variant must be one of {AMAD_VARIANTS}; got {variant!r}")
    temperature = _positive("temperature", temperature)
    eps = _positive("eps", eps)
    T, S, mask = _prepare_maps(teacher_attn, student_attn, query_mask)
    a, t_unit, s_unit = _alignment(T, S, temperature, eps)
    if detach_weights:
        a = a.detach()
    if variant == "mse":
        return (t_unit - torch.bmm(a, s_unit)).pow(2).sum(-1)
    # Mixing in (B, Ht, Q*K) keeps the largest intermediate 4-D, never (B, Ht, Hs, Q, K).
    M = torch.bmm(a, S.flatten(2)).view_as(T)
    return _masked_row_mean(_kl_rows(T, M, eps), mask)


def amad_loss(
    teacher_attn: Tensor,
    student_attn: Tensor,
    query_mask: Tensor | None = None,
    *,
    variant: str = "kl",
    temperature: float = 1.0,
    eps: float = 1e-8,
    detach_weights: bool = False,
) -> Tensor:
    """AMAD attention-alignment loss (paper Eq. 9 for ``"kl"``, Eq. 4–5 for ``"mse"``).

    :func:`amad_loss_per_head` summed over the ``Ht`` teacher heads and averaged over the batch.

    Args:
        teacher_attn: ``(B, Ht, Q, K)`` attention probabilities.
        student_attn: ``(B, Hs, Q, K)`` attention probabilities; any ``Hs >= 1``.
        query_mask: ``(B, Q)`` bool, True for real query rows; None means all rows are real.
        variant, temperature, eps, detach_weights: as in :func:`amad_loss_per_head`.

    Returns:
        0-dim tensor.
    """
    per_head = amad_loss_per_head(
        teacher_attn,
        student_attn,
        query_mask,
        variant=variant,
        temperature=temperature,
        eps=eps,
        detach_weights=detach_weights,
    )
    return per_head.sum(1).mean(0)


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------


def one_to_one_loss(
    teacher_attn: Tensor,
    student_attn: Tensor,
    query_mask: Tensor | None = None,
    *,
    eps: float = 1e-8,
) -> Tensor:
    """MiniLM-style head-to-head attention KD: student head ``k`` learns teacher head ``k``.

    When ``Hs < Ht`` the teacher heads ``k >= Hs`` are dropped: that is the conventional approach
    AMAD is shown to beat, since those heads' knowledge is lost.

    Args:
        teacher_attn: ``(B, Ht, Q, K)`` attention probabilities.
        student_attn: ``(B, Hs, Q, K)`` attention probabilities, ``Hs <= Ht``.
        query_mask: ``(B, Q)`` bool, True for real query rows; None means all rows are real.
        eps: added inside the logs, > 0.

    Returns:
        0-dim tensor: ``KL(T_k[q] || S_k[q])`` averaged over valid rows, summed over the ``Hs``
        heads, averaged over the batch.
    """
    eps = _positive("eps", eps)
    _check_maps(teacher_attn, student_attn, query_mask)
    hs, ht = student_attn.shape[1], teacher_attn.shape[1]
    if hs > ht:
        raise ValueError(
            f"student_attn has shape {tuple(student_attn.shape)} but teacher_attn has "
            f"{tuple(teacher_attn.shape)}: one_to_one needs Hs <= Ht ({hs} > {ht})"
        )
    T, S, mask = _prepare_maps(teacher_attn[:, :hs], student_attn, query_mask)
    return _masked_row_mean(_kl_rows(T, S, eps), mask).sum(1).mean(0)


def head_mean_loss(
    teacher_attn: Tensor,
    student_attn: Tensor,
    query_mask: Tensor | None = None,
    *,
    eps: float = 1e-8,
) -> Tensor:
    """KD between head-averaged maps: ``KL(mean_i T_i || mean_j S_j)`` per row.

    Args:
        teacher_attn: ``(B, Ht, Q, K)`` attention probabilities.
        student_attn: ``(B, Hs, Q, K)`` attention probabilities; any ``Hs``.
        query_mask: ``(B, Q)`` bool, True for real query rows; None means all rows are real.
        eps: added inside the logs, > 0.

    Returns:
        0-dim tensor: the row KL averaged over valid rows, then over the batch.
    """
    eps = _positive("eps", eps)
    T, S, mask = _prepare_maps(teacher_attn, student_attn, query_mask)
    return _masked_row_mean(_kl_rows(T.mean(1), S.mean(1), eps), mask).mean(0)


def _check_qkv(teacher_qkv: QKV, student_qkv: QKV, key_mask: Tensor | None, heads: int) -> None:
    ref = None
    for who, qkv in (("teacher_qkv", teacher_qkv), ("student_qkv", student_qkv)):
        for part in ("query", "key", "value"):
            x = getattr(qkv, part)
            name = f"{who}.{part}"
            if x.dim() != 3:
                raise ValueError(f"{name} must be 3-D (B, T, hidden); got shape {tuple(x.shape)}")
            if ref is None:
                ref = ("teacher_qkv.query", tuple(x.shape))
            elif tuple(x.shape[:2]) != ref[1][:2]:
                raise ValueError(
                    f"{name} has shape {tuple(x.shape)} but {ref[0]} has {ref[1]}: B and T must "
                    "match (relation distillation compares a sequence with itself, so it applies "
                    "to self-attention)"
                )
            if x.shape[2] % heads:
                raise ValueError(
                    f"relation_heads={heads} does not divide the hidden size of {name} "
                    f"(shape {tuple(x.shape)})"
                )
    assert ref is not None
    if key_mask is not None:
        want = ref[1][:2]
        if tuple(key_mask.shape) != want:
            raise ValueError(
                f"key_mask has shape {tuple(key_mask.shape)} but the projections need "
                f"(B, T) = {want}"
            )
        if key_mask.dtype != torch.bool:
            raise ValueError(f"key_mask must be a bool tensor; got dtype {key_mask.dtype}")


def _relation(x: Tensor, heads: int, key_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``softmax(X X^T / sqrt(d_r))`` per relation head: ``(B, T, hidden)`` -> ``(B, A, T, T)``."""
    B, T, hidden = x.shape
    d = hidden // heads
    xr = x.to(dtype).view(B, T, heads, d).transpose(1, 2)
    scores = torch.matmul(xr, xr.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1)


def relation_loss(
    teacher_qkv: QKV,
    student_qkv: QKV,
    key_mask: Tensor | None = None,
    *,
    relation_heads: int,
    eps: float = 1e-8,
) -> Tensor:
    """MiniLMv2 multi-head self-attention relation distillation.

    Each of query, key and value is split into ``A = relation_heads`` relation heads of size
    ``d_r = hidden / A`` (teacher and student each with their own ``hidden``, so their head counts
    need not match; only ``A`` is shared). For ``X`` in ``{q, k, v}`` the relation
    ``R = softmax(X X^T / sqrt(d_r))`` is ``(B, A, T, T)``; the loss is
    ``KL(R_teacher || R_student)`` per row.

    Mapping to MiniLMv2 (Wang et al., 2021, Eq. 4–5): their loss is
    ``sum_{QQ,KK,VV} 1/(A |x|) sum_a sum_t KL(R^T_{a,t} || R^S_{a,t})``, i.e. summed over
    the three relations and averaged over relation heads and rows. Here the row average counts only
    real tokens and is taken per sequence, then averaged over the batch (MiniLMv2 has no padding
    term; with no padding the two agree).

    Args:
        teacher_qkv, student_qkv: :class:`~amad.outputs.QKV` of one layer, each field
            ``(B, T, hidden)``; ``hidden`` may differ between teacher and student.
        key_mask: ``(B, T)`` bool, True for real tokens; None means all are real. Masked tokens are
            removed from each softmax (as keys) and from the row average (as queries).
        relation_heads: ``A``, dividing every ``hidden``.
        eps: added inside the logs, > 0.

    Returns:
        0-dim tensor.
    """
    if (
        isinstance(relation_heads, bool)
        or not isinstance(relation_heads, int)
        or relation_heads < 1
    ):
        raise ValueError(f"relation_heads must be an int >= 1; got {relation_heads!r}")
    eps = _positive("eps", eps)
    _check_qkv(teacher_qkv, student_qkv, key_mask, relation_heads)
    B, T, _ = teacher_qkv.query.shape
    if key_mask is None:
        key_mask = torch.ones(B, T, dtype=torch.bool, device=teacher_qkv.query.device)
    # A sequence with no real token would softmax over nothing (NaN, and NaN gradients even behind
    # a `where`); let it attend everywhere instead: its rows are excluded from the mean anyway.
    softmax_mask = key_mask | ~key_mask.any(-1, keepdim=True)
    dtype = _compute_dtype(
        *(getattr(q, p) for q in (teacher_qkv, student_qkv) for p in ("query", "key", "value"))
    )
    total = None
    for part in ("query", "key", "value"):
        r_t = _relation(getattr(teacher_qkv, part), relation_heads, softmax_mask, dtype)
        r_s = _relation(getattr(student_qkv, part), relation_heads, softmax_mask, dtype)
        term = _masked_row_mean(_kl_rows(r_t, r_s, eps), key_mask).mean(1)  # (B,)
        total = term if total is None else total + term
    assert total is not None
    return total.mean(0)


def logit_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al. (2015) logit distillation.

    ``KL(softmax(t/T) || softmax(s/T)) * T^2``, summed over classes and averaged over the batch
    (``batchmean``); the ``T^2`` keeps gradient magnitudes comparable across temperatures.

    Args:
        student_logits: ``(B, C)``.
        teacher_logits: ``(B, C)``.
        temperature: ``T`` > 0.

    Returns:
        0-dim tensor.
    """
    temperature = _positive("temperature", temperature)
    if student_logits.dim() != 2:
        raise ValueError(
            f"student_logits must be 2-D (B, C); got shape {tuple(student_logits.shape)}"
        )
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"student_logits has shape {tuple(student_logits.shape)} but teacher_logits has "
            f"{tuple(teacher_logits.shape)}: they must match"
        )
    dtype = _compute_dtype(student_logits, teacher_logits)
    log_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    # log-space target: exact for zero-probability classes, no eps needed.
    kl = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
    return kl * temperature**2
