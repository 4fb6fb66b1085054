"""AMAD-KL per-head losses through the native kernel, with autograd; None where it does not apply.

:func:`amad.losses.amad_loss_per_head` tries this first for ``variant="kl"`` and uses its PyTorch
implementation when it returns None. Same definition and conventions as there (paper Eq. 2 and 9);
the native kernel computes in float32 and only differentiates with respect to the student's maps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from amad.kernels import NativeKernels, library

# Entries above this (or +inf) make the kernel hand over to PyTorch: with entries in [0, LIMIT] and
# eps >= MIN_EPS every argument of its logarithm is a finite normal float32.
LIMIT = 1e6
MIN_EPS = 1e-30
MAX_HEAD_PAIRS = 4096  # Ht * Hs: past this the per-thread scratch (pair accumulators, Ht blocks) outgrows L2
HALF_DTYPES = (torch.float16, torch.bfloat16)


def amad_kl_per_head(
    teacher_attn: Tensor,
    student_attn: Tensor,
    query_mask: Tensor | None,
    *,
    temperature: float,
    eps: float,
    detach_weights: bool,
) -> Tensor | None:
    """``(B, Ht)`` per-head AMAD-KL losses, or None when the native path does not apply.

    Shapes must already be validated. It does not apply to: no kernels (see
    :mod:`amad.kernels`), tensors off the CPU, float64 maps, a teacher that needs gradients, empty
    dimensions, ``eps < 1e-30``, ``Ht * Hs > 4096``, or maps with NaN, negative, infinite or huge
    (> 1e6) entries in valid rows (PyTorch then computes the value or raises the right error).
    """
    kernels = library()
    if kernels is None or not _applies(teacher_attn, student_attn, eps):
        return None
    t = teacher_attn.detach().to(torch.float32).contiguous()
    s = student_attn.to(torch.float32).contiguous()
    valid = None if query_mask is None else query_mask.contiguous()
    want_grad = torch.is_grad_enabled() and s.requires_grad
    loss, status = _NativeAmadKL.apply(
        s, t, valid, float(temperature), float(eps), detach_weights, want_grad, kernels
    )
    if bool(status.any()):
        return None  # the graph built above is dropped with `loss`
    return loss


def _applies(teacher_attn: Tensor, student_attn: Tensor, eps: float) -> bool:
    if teacher_attn.requires_grad and torch.is_grad_enabled():
        return False
    for t in (teacher_attn, student_attn):
        if t.device.type != "cpu" or not (t.dtype == torch.float32 or t.dtype in HALF_DTYPES):
            return False
        if t.numel() == 0:
            return False
    heads = teacher_attn.shape[1] * student_attn.shape[1]
    return heads <= MAX_HEAD_PAIRS and math.isfinite(eps) and eps >= MIN_EPS


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _NativeAmadKL(torch.autograd.Function):
    """``(s, t, valid, tau, eps, detach, want_grad, kernels) -> (loss (B, Ht), status (B,) int8)``.

    ``s`` ``(B, Hs, Q, K)`` and ``t`` ``(B, Ht, Q, K)`` are contiguous float32, ``valid`` ``(B, Q)``
    bool or None. A non-zero status marks a batch element whose values the kernel refused.

    With ``want_grad`` the forward kernel also computes the gradient of ``loss.sum()`` while each
    batch element's maps are in cache. The gradient is linear in the upstream gradient, so when
    that is one constant ``c`` (``sum``/``mean`` reductions, a loss weight: the usual case) the
    backward pass scales the saved gradient by ``c`` in place and returns it; any other upstream
    gradient, or a second backward through a retained graph, is recomputed exactly by the
    backward kernel.
    """

    @staticmethod
    def forward(ctx, s, t, valid, tau, eps, detach_weights, want_grad, kernels: NativeKernels):
        B, Ht, Q, K = t.shape
        Hs = s.shape[1]
        loss = t.new_empty(B, Ht)
        a = t.new_empty(B, Ht, Hs)
        w = t.new_empty(B, Ht, Hs)
        nt = t.new_empty(B, Ht)
        sq_s = t.new_empty(B, Hs)
        grad_unit = torch.empty_like(s) if want_grad else None
        status = torch.zeros(B, dtype=torch.int8)
        kernels.lib.amad_kl_forward(
            t.data_ptr(), s.data_ptr(), _ptr(valid), B, Ht, Hs, Q, K, tau, eps, LIMIT,
            loss.data_ptr(), a.data_ptr(), w.data_ptr(), nt.data_ptr(), sq_s.data_ptr(),
            _ptr(grad_unit), int(detach_weights), status.data_ptr(), kernels.threads(),
        )  # fmt: skip
        ctx.mark_non_differentiable(status)
        ctx.save_for_backward(s, t, valid, a, w, nt, sq_s)
        # Held outside save_for_backward: the first backward scales it in place and hands it on
        # (no second map-sized buffer, no write to fresh memory); a later backward of a retained
        # graph finds None and recomputes with the backward kernel.
        ctx.grad_unit = grad_unit
        ctx.settings = (tau, eps, detach_weights, kernels)
        return loss, status

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, _g_status):
        none = (None,) * 7
        if not ctx.needs_input_grad[0]:
            return (None, *none)
        s, t, valid, a, w, nt, sq_s = ctx.saved_tensors
        g = g_loss.to(torch.float32)
        grad_unit, ctx.grad_unit = ctx.grad_unit, None
        if grad_unit is not None:
            c = g.reshape(-1)[:1]
            if bool((g == c).all()):
                return (grad_unit.mul_(c), *none)
        tau, eps, detach_weights, kernels = ctx.settings
        B, Ht, Q, K = t.shape
        Hs = s.shape[1]
        g = g.contiguous()
        grad_s = torch.empty_like(s)
        failed = kernels.lib.amad_kl_backward(
            t.data_ptr(), s.data_ptr(), _ptr(valid), B, Ht, Hs, Q, K, tau, eps,
            a.data_ptr(), w.data_ptr(), nt.data_ptr(), sq_s.data_ptr(), g.data_ptr(),
            int(detach_weights), grad_s.data_ptr(), kernels.threads(),
        )  # fmt: skip
        if failed:
            raise MemoryError("amad_kl_backward: could not allocate its per-thread scratch memory")
        return (grad_s, *none)
