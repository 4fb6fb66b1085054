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
  host sync per call (AMAD: a second one only when a map holds NaN, inf, negative or huge values
  somewhere, padding rows included).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from amad.kernels.native_kl import amad_kl_per_head
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


# --------------------------------------------------------------------------------------------
# AMAD internals
#
# AMAD touches every element of the (B, Ht, Q, K) teacher maps, so its cost is set by how many
# passes are made over them. The implementation below makes few, and in the common case (float32
# or float64 maps with finite values) never materialises a temporary the size of the teacher maps:
#
# * Masked rows are not zeroed by copying the teacher maps. When the maps are finite and in
#   [0, _CLEAN_MAX] everywhere (the usual case: padding query rows of a softmax are distributions
#   too), the teacher maps are used as they are and masked rows are removed by per-row weights on
#   small (B, H, Q) row reductions, or by zero rows of the masked student copy in every product.
#   Only otherwise (NaN, inf, negative or huge values anywhere) are masked rows zeroed with `where`,
#   which also gives the exact NaN/negative check of the unmasked rows.
# * Cosines come from Gram matrices (one bmm of the flattened maps), norms from row reductions: no
#   unit-vector copies.
# * The KL mixture term is a custom autograd Function that works through the batch in small chunks
#   (each chunk's temporaries stay in cache), computes log((T+eps)/(M+eps)) with one log, and
#   recomputes the mixture in backward instead of saving it.
# * The MSE variant is exact algebra on the Gram matrices:
#   ||t/|t| - sum_j a_j s_j/|s_j| ||^2 = |t|^2/|t|'^2 - 2 sum_j a_j w_j + sum_jk a_j a_k C_jk,
#   with w the teacher-student cosines and C the student-student ones (|.|' the eps-floored norm).
# --------------------------------------------------------------------------------------------

# Maps whose entries all lie in [0, _CLEAN_MAX] take the copy-free path. Any finite bound works;
# this one keeps every product of a padding-row value with itself finite in float32, and the
# 1e20 * eps cap (KL only) keeps padding-row value / eps finite for any eps.
_CLEAN_MAX = 1e6
# Elements of the teacher maps per chunk of the KL Function: about 512 KiB in float32 on CPU, where
# keeping a chunk's temporaries in cache makes the elementwise passes ~2x faster; large on
# accelerators, where a chunk only has to be big enough to fill the device.
_CHUNK_ELEMENTS = {"cpu": 1 << 17}
_CHUNK_ELEMENTS_OTHER = 1 << 22


class _Prepared(NamedTuple):
    t: Tensor  # (B, Ht, Q, K) teacher maps in the compute dtype, differentiable (grads route here)
    s: Tensor  # (B, Hs, Q, K) student maps, likewise
    t_data: Tensor  # (B, Ht, Q, K) no grad; masked rows hold values in [0, clean limit], or 0
    s_data: Tensor  # (B, Hs, Q, K) no grad; masked rows are exactly 0
    row_mask: Tensor | None  # (B, Q) 0/1 in the compute dtype; None when every row is real
    row_weight: Tensor  # (B, Q) row_mask / number of valid rows (0 for a batch element with none)


def _prepare_amad(
    teacher_attn: Tensor, student_attn: Tensor, query_mask: Tensor | None, eps: float | None
) -> _Prepared:
    """Validate, upcast, check values (one host sync) and mask the student; see the notes above.

    ``eps`` is the one the KL divides padding rows by, None when nothing divides by it.
    """
    _check_maps(teacher_attn, student_attn, query_mask)
    dtype = _compute_dtype(teacher_attn, student_attn)
    t, s = teacher_attn.to(dtype), student_attn.to(dtype)
    B, _, Q, _ = t.shape
    with torch.no_grad():
        t_data, s_data = t.detach(), s.detach()
        limit = _CLEAN_MAX if eps is None else min(_CLEAN_MAX, 1e20 * eps)
        clean = _clean(limit, t_data, s_data)
        if query_mask is None:
            row_mask = None
            row_weight = t_data.new_full((B, Q), 1.0 / Q if Q else 0.0)
            if not all(clean):
                _raise_if_bad(t_data, s_data)
        else:
            rows = query_mask[:, None, :, None]
            row_mask = query_mask.to(dtype)
            row_weight = row_mask / row_mask.sum(-1, keepdim=True).clamp_min(1)
            if not clean[0]:
                t_data = torch.where(rows, t_data, 0.0)
            # The student copy is small (Hs heads) and zero rows make every product exact.
            if clean[1]:
                s_data = s_data * row_mask[:, None, :, None]
            else:
                s_data = torch.where(rows, s_data, 0.0)
            if not all(clean):
                _raise_if_bad(t_data, s_data)
    return _Prepared(t, s, t_data.contiguous(), s_data.contiguous(), row_mask, row_weight)


def _clean(limit: float, *maps: Tensor) -> list[bool]:
    """Per map: are all entries in [0, limit]? (NaN fails every comparison.)"""
    ext = []
    for m in maps:  # all in the compute dtype, so they stack
        ext += torch.aminmax(m) if m.numel() else (m.new_zeros(()),) * 2
    ext = torch.stack(ext).tolist()
    return [0 <= lo and hi <= limit for lo, hi in zip(ext[::2], ext[1::2], strict=True)]


def _raise_if_bad(t_data: Tensor, s_data: Tensor) -> None:
    """NaN or negative entries (in unmasked rows: masked ones are zero by now) raise ValueError."""
    lows = torch.stack([m.min() if m.numel() else m.new_zeros(()) for m in (t_data, s_data)])
    for name, low in zip(("teacher_attn", "student_attn"), lows.tolist(), strict=True):
        if not low >= 0:
            shape = tuple(t_data.shape if name == "teacher_attn" else s_data.shape)
            raise ValueError(
                f"{name} (shape {shape}) has NaN or negative entries in unmasked rows: attention "
                "maps must be probabilities"
            )


class _Gram(torch.autograd.Function):
    """Gram statistics of the prepared maps over valid rows.

    ``(t, s, t_data, s_data, row_mask) -> (g_ts (B, Ht, Hs), sq_t (B, Ht), g_ss (B, Hs, Hs))``:
    teacher-student dot products, squared teacher norms and student-student dot products of the
    flattened maps. ``t``/``s`` only route gradients; the values come from ``t_data``/``s_data``.
    """

    @staticmethod
    def forward(ctx, t, s, t_data, s_data, row_mask):
        B, Ht = t_data.shape[:2]
        tf, sf = t_data.view(B, Ht, -1), s_data.view(B, s_data.shape[1], -1)
        # Masked rows of s_data are 0, so padding rows of t_data drop out of the products.
        g_ts = torch.bmm(tf, sf.transpose(1, 2))
        g_ss = torch.bmm(sf, sf.transpose(1, 2))
        row_sq = torch.linalg.vector_norm(t_data, dim=-1).square_()  # (B, Ht, Q)
        if row_mask is not None:
            row_sq = torch.where(row_mask[:, None, :] > 0, row_sq, 0.0)
        ctx.save_for_backward(t_data, s_data, row_mask)
        return g_ts, row_sq.sum(-1), g_ss

    @staticmethod
    @once_differentiable
    def backward(ctx, d_ts, d_sq, d_ss):
        t_data, s_data, row_mask = ctx.saved_tensors
        with _no_autocast(t_data.device):
            return _Gram._backward(ctx, t_data, s_data, row_mask, d_ts, d_sq, d_ss)

    @staticmethod
    def _backward(ctx, t_data, s_data, row_mask, d_ts, d_sq, d_ss):
        B, Ht = t_data.shape[:2]
        tf, sf = t_data.view(B, Ht, -1), s_data.view(B, s_data.shape[1], -1)
        grad_t = grad_s = None
        if ctx.needs_input_grad[1]:
            gs = torch.bmm(d_ts.transpose(1, 2), tf)
            if row_mask is not None:  # padding rows of t_data (finite) must not leak in
                gs.view_as(s_data).mul_(row_mask[:, None, :, None])
            gs.baddbmm_(d_ss + d_ss.transpose(1, 2), sf)
            grad_s = gs.view_as(s_data)
        if ctx.needs_input_grad[0]:
            gt = torch.bmm(d_ts, sf).view_as(t_data)  # 0 on masked rows (those of sf are 0)
            scale = 2 * d_sq[:, :, None, None]
            if row_mask is not None:
                scale = scale * row_mask[:, None, :, None]
            grad_t = gt.addcmul_(t_data, scale)
        return grad_t, grad_s, None, None, None


class _MixtureKL(torch.autograd.Function):
    """``sum_q row_weight[q] * KL(T_i[q] || M_i[q])`` per teacher head, ``M_i = sum_j a_ij S_j``.

    ``(t, s, a, t_data, s_data, row_weight, eps) -> (B, Ht)``, computed as
    ``T log((T+eps) / (M+eps))`` summed over keys; the rows of ``a`` must sum to 1. Works through
    the batch in chunks so each chunk's temporaries stay in cache; backward recomputes ``M`` rather
    than saving it. ``t``/``s`` only route gradients; the values come from ``t_data``/``s_data``.
    """

    @staticmethod
    def forward(ctx, t, s, a, t_data, s_data, row_weight, eps):
        B, Ht, Q, K = t_data.shape
        tf = t_data.view(B, Ht, Q * K)
        # Rows of `a` sum to 1 (softmax), so M + eps = a @ (S + eps): eps is added once to the
        # small student maps instead of to every mixture element.
        s_eps = (s_data + eps).view(B, s_data.shape[1], Q * K)
        chunk = _chunk_size(t_data)
        out = tf.new_empty(B, Ht)
        buf_m = tf.new_empty(min(chunk, B), Ht, Q * K)
        buf_e = torch.empty_like(buf_m)
        for b0 in range(0, B, chunk):
            b1 = min(B, b0 + chunk)
            n = b1 - b0
            m = torch.bmm(a[b0:b1], s_eps[b0:b1], out=buf_m[:n])  # M + eps
            e = torch.add(tf[b0:b1], eps, out=buf_e[:n]).div_(m).log_().mul_(tf[b0:b1])
            # Padding rows: M + eps = eps there, so e is finite, and their weight is 0.
            rows = e.view(n, Ht, Q, K).sum(-1)  # (n, Ht, Q)
            out[b0:b1] = torch.bmm(rows, row_weight[b0:b1, :, None]).squeeze(-1)
        ctx.save_for_backward(t_data, s_data, s_eps, a, row_weight)
        ctx.eps = eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        with _no_autocast(g.device):
            return _MixtureKL._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        t_data, s_data, s_eps, a, row_weight = ctx.saved_tensors
        eps = ctx.eps
        need_t, need_s, need_a = ctx.needs_input_grad[:3]
        B, Ht, Q, K = t_data.shape
        Hs = s_data.shape[1]
        tf = t_data.view(B, Ht, Q * K)
        grad_t = torch.empty_like(t_data) if need_t else None
        grad_s = torch.empty_like(s_data) if need_s else None
        # d loss_i / d M_i[q] = -g_i row_weight[q] D_i[q], with D_i = T_i / (M_i + eps)
        neg_ag = (a * g[:, :, None]).neg_().transpose(1, 2)  # (B, Hs, Ht)
        if need_a:
            dots = torch.empty_like(a)  # sum_q row_weight[q] D_i[q] . S_j[q]
            s_w = (s_data * row_weight[:, None, :, None]).view(B, Hs, Q * K)
        chunk = _chunk_size(t_data)
        buf_m = tf.new_empty(min(chunk, B), Ht, Q * K)
        buf_e = torch.empty_like(buf_m) if need_t else None
        for b0 in range(0, B, chunk):
            b1 = min(B, b0 + chunk)
            n = b1 - b0
            tc = tf[b0:b1]
            m = torch.bmm(a[b0:b1], s_eps[b0:b1], out=buf_m[:n])  # M + eps
            if need_t:  # d/dT of T log((T+eps)/(M+eps)) = log((T+eps)/(M+eps)) + T/(T+eps)
                gt = grad_t[b0:b1].view(n, Ht, Q * K)
                e = torch.add(tc, eps, out=buf_e[:n])
                torch.div(tc, e, out=gt)
                gt.add_(e.div_(m).log_())
                scale = g[b0:b1, :, None] * row_weight[b0:b1, None, :]
                gt.view(n, Ht, Q, K).mul_(scale[..., None])
            d = torch.div(tc, m, out=m)  # finite on padding rows, weighted out below
            if need_a:
                torch.bmm(d, s_w[b0:b1].transpose(1, 2), out=dots[b0:b1])
            if need_s:
                gs = torch.bmm(neg_ag[b0:b1], d, out=grad_s[b0:b1].view(n, Hs, Q * K))
                gs.view(n, Hs, Q, K).mul_(row_weight[b0:b1, None, :, None])
        grad_a = dots.mul_(g[:, :, None]).neg_() if need_a else None
        return grad_t, grad_s, grad_a, None, None, None, None


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off: everything here computes in the maps' (at least float32) dtype, and the
    ``out=`` buffers below would clash with autocast's reduced-precision results."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _chunk_size(t_data: Tensor) -> int:
    """Batch elements per chunk."""
    elements = _CHUNK_ELEMENTS.get(t_data.device.type, _CHUNK_ELEMENTS_OTHER)
    return max(1, elements // max(1, math.prod(t_data.shape[1:])))


class _Alignment(NamedTuple):
    a: Tensor  # (B, Ht, Hs) alignment weights (Eq. 2)
    w: Tensor  # (B, Ht, Hs) cosines
    sq_t: Tensor  # (B, Ht) squared teacher norms
    nt: Tensor  # (B, Ht) eps-floored teacher norms
    g_ss: Tensor  # (B, Hs, Hs) student Gram matrix
    ns: Tensor  # (B, Hs) eps-floored student norms


def _alignment(p: _Prepared, temperature: float, eps: float) -> _Alignment:
    """Paper Eq. 2 on prepared maps; the single implementation behind align_weights and amad_loss.

    Norms are floored at eps (``sqrt(max(|x|^2, eps^2))``): an all-zero head (every row masked)
    gets cosine 0 and finite gradients instead of 0/0.
    """
    g_ts, sq_t, g_ss = _Gram.apply(p.t, p.s, p.t_data, p.s_data, p.row_mask)
    floor = eps * eps
    nt = sq_t.clamp_min(floor).sqrt()
    ns = g_ss.diagonal(dim1=1, dim2=2).clamp_min(floor).sqrt()
    w = g_ts / (nt[:, :, None] * ns[:, None, :])
    return _Alignment(torch.softmax(w / temperature, dim=-1), w, sq_t, nt, g_ss, ns)


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
    with _no_autocast(teacher_attn.device):
        p = _prepare_amad(teacher_attn, student_attn, query_mask, None)
        return _alignment(p, temperature, _DEFAULT_EPS).a


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
      over the flattened maps (masked rows zeroed), a value in ``[0, 4]``. It is computed exactly
      from the ``Ht x Hs`` and ``Hs x Hs`` cosine matrices, with no map-sized intermediate.

    Gradients flow to both maps (the teacher's too, if it requires grad), but only first-order:
    the backward passes are hand-written and not themselves differentiable.

    On CPU, ``"kl"`` with float32 (or half) maps runs as one fused native kernel
    (:mod:`amad.kernels`, ~4x faster at the default shapes) when it is available and the teacher
    needs no gradient; otherwise, and for everything else, as PyTorch ops. Both give the same
    values to float32 rounding.

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
    if variant == "kl":
        _check_maps(teacher_attn, student_attn, query_mask)
        native = amad_kl_per_head(
            teacher_attn,
            student_attn,
            query_mask,
            temperature=temperature,
            eps=eps,
            detach_weights=detach_weights,
        )
        if native is not None:
            return native
    with _no_autocast(teacher_attn.device):
        return _amad_per_head(
            _prepare_amad(teacher_attn, student_attn, query_mask, eps if variant == "kl" else None),
            variant,
            temperature,
            eps,
            detach_weights,
        )


def _amad_per_head(
    p: _Prepared, variant: str, temperature: float, eps: float, detach_weights: bool
) -> Tensor:
    """:func:`amad_loss_per_head` on prepared maps."""
    if variant == "kl":
        if detach_weights:  # the alignment needs no graph at all
            with torch.no_grad():
                a = _alignment(p, temperature, eps).a
        else:
            a = _alignment(p, temperature, eps).a
        return _MixtureKL.apply(p.t, p.s, a, p.t_data, p.s_data, p.row_weight, eps)
    al = _alignment(p, temperature, eps)
    a = al.a.detach() if detach_weights else al.a
    # ||t/|t|' - sum_j a_j s_j/|s_j|'||^2 expanded; |t|^2/|t|'^2 is 1 unless the head is ~all zero.
    self_term = al.sq_t / al.nt.square()
    cross = (a * al.w).sum(-1)
    c_ss = al.g_ss / (al.ns[:, :, None] * al.ns[:, None, :])
    mix = (torch.bmm(a, c_ss) * a).sum(-1)
    # The expansion can round a few ulps below 0 where the true value is 0.
    return (self_term - 2 * cross + mix).clamp_min(0.0)


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
    teacher_heads: Sequence[int] | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """MiniLM-style head-to-head attention KD: student head ``j`` learns one teacher head.

    By default (``teacher_heads=None``) student head ``k`` learns teacher head ``k`` and, when
    ``Hs < Ht``, the teacher heads ``k >= Hs`` are dropped: that is the conventional approach AMAD
    is shown to beat, since those heads' knowledge is lost. A student pruned from its teacher can
    instead pass the head each of its heads was cut from (:func:`amad.pruning.recorded_origins`):
    "one-to-one by origin", the strongest one-to-one baseline for such students.

    Args:
        teacher_attn: ``(B, Ht, Q, K)`` attention probabilities.
        student_attn: ``(B, Hs, Q, K)`` attention probabilities, ``Hs <= Ht``.
        query_mask: ``(B, Q)`` bool, True for real query rows; None means all rows are real.
        teacher_heads: ``Hs`` distinct teacher head indices in ``[0, Ht)``: student head ``j``
            learns teacher head ``teacher_heads[j]``; None means ``0 .. Hs-1``.
        eps: added inside the logs, > 0.

    Returns:
        0-dim tensor: ``KL(T_{teacher_heads[j]}[q] || S_j[q])`` averaged over valid rows, summed
        over the ``Hs`` student heads, averaged over the batch.
    """
    eps = _positive("eps", eps)
    _check_maps(teacher_attn, student_attn, query_mask)
    hs, ht = student_attn.shape[1], teacher_attn.shape[1]
    if hs > ht:
        raise ValueError(
            f"student_attn has shape {tuple(student_attn.shape)} but teacher_attn has "
            f"{tuple(teacher_attn.shape)}: one_to_one needs Hs <= Ht ({hs} > {ht})"
        )
    if teacher_heads is None:
        chosen = teacher_attn[:, :hs]
    else:
        heads = list(teacher_heads)
        valid = all(isinstance(h, int) and not isinstance(h, bool) and 0 <= h < ht for h in heads)
        if len(heads) != hs or not valid or len(set(heads)) != hs:
            raise ValueError(
                f"teacher_heads must list {hs} distinct teacher head indices in [0, {ht}), one "
                f"per student head; got {teacher_heads!r}"
            )
        chosen = teacher_attn[:, heads]
    T, S, mask = _prepare_maps(chosen, student_attn, query_mask)
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


def logit_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: Tensor | None = None) -> Tensor:
    """Hinton et al. (2015) logit distillation.

    ``KL(softmax(t/T) || softmax(s/T)) * T^2``, summed over classes and averaged over the batch
    (``batchmean``); the ``T^2`` keeps gradient magnitudes comparable across temperatures. Per-token
    logits (a decoder's) are distilled at every token and averaged over the real ones.

    Args:
        student_logits: ``(B, C)``, or ``(B, T, C)`` per token.
        teacher_logits: the same shape.
        temperature: ``T`` > 0.
        mask: ``(B, T)`` bool for per-token logits, True on real tokens (None: all real); not for ``(B, C)``.

    Returns:
        0-dim tensor (0 when no token is real).
    """
    temperature = _positive("temperature", temperature)
    if student_logits.dim() not in (2, 3):
        raise ValueError(
            f"student_logits must be 2-D (B, C) or 3-D (B, T, C); got shape {tuple(student_logits.shape)}"
        )
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"student_logits has shape {tuple(student_logits.shape)} but teacher_logits has "
            f"{tuple(teacher_logits.shape)}: they must match"
        )
    if mask is not None and (student_logits.dim() != 3 or tuple(mask.shape) != tuple(student_logits.shape[:2]) or mask.dtype != torch.bool):
        raise ValueError(
            f"mask must be a (B, T) bool tensor for per-token logits {tuple(student_logits.shape)}; got shape "
            f"{tuple(mask.shape)}, dtype {mask.dtype}"
        )
    dtype = _compute_dtype(student_logits, teacher_logits)
    log_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if student_logits.dim() == 2:
        # log-space target: exact for zero-probability classes, no eps needed.
        kl = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
        return kl * temperature**2
    per_token = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)  # (B, T)
    if mask is None:
        return per_token.mean() * temperature**2
    # `where`: a padding token's logits may hold anything
    return torch.where(mask, per_token, 0.0).sum() / mask.sum().clamp_min(1) * temperature**2
