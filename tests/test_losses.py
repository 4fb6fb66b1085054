"""Tests for amad.losses.

Expected values come from naive float64 reference implementations written here with explicit
Python loops over batch elements, heads and valid rows, or from pinned constants; never from the
code under test.

AMAD-KL tests take the ``path`` fixture and run twice: on the native kernel (float32 maps, student
gradients, float32 tolerances) and on the PyTorch implementation (float64, teacher gradients too).
A spy on the kernel entry point records, per call, whether the kernel computed the loss or
declined, and every such test asserts what it saw; the cases where the kernel must decline
(float64, teacher gradients, eps < 1e-30, > 4096 head pairs, bad values in valid rows) are named
and asserted as declines.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass

import pytest
import torch
import torch.utils._pytree
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import amad.kernels
import amad.losses
from amad.losses import (
    align_weights,
    amad_loss,
    amad_loss_per_head,
    head_mean_loss,
    logit_kd_loss,
    one_to_one_loss,
    relation_loss,
)
from amad.outputs import QKV

torch.set_num_threads(1)
EPS = 1e-8
SETTINGS = settings(max_examples=30, deadline=None)


NATIVE, DECLINED = "native", "declined"


class KernelSpy:
    """Wraps the native entry point ``amad.losses`` calls for AMAD-KL and records, per call,
    whether the kernel computed the loss (``"native"``) or declined (``"declined"``: it returned
    None and the PyTorch implementation ran)."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, *args, **kwargs):
        out = self.real(*args, **kwargs)
        self.calls.append(NATIVE if out is not None else DECLINED)
        return out


@dataclass
class Path:
    """One implementation of AMAD-KL, with the inputs it runs on and the tolerances that suit them.

    * ``native``: the fused kernel. It applies to float32 (or half) maps of a teacher that needs no
      gradient, so tests hand it float32 maps, ask only for student gradients, and compare with the
      float64 reference at float32 tolerances.
    * ``pytorch``: the kernel turned off. Float64 maps, teacher gradients too, tight tolerances.
    """

    name: str
    dtype: torch.dtype
    teacher_grad: bool
    spy: KernelSpy

    @property
    def kl(self) -> str:
        """What an AMAD-KL call on this path must record."""
        return NATIVE if self.name == "native" else DECLINED

    def reset(self) -> None:
        self.spy.calls.clear()

    def expect(self, *outcomes: str) -> None:
        """The kernel entry point was called exactly ``len(outcomes)`` times since the last check,
        with these outcomes (``()``: not called at all, e.g. for the mse variant)."""
        calls, self.spy.calls = self.spy.calls, []
        assert calls == list(outcomes), f"{self.name} path: expected kernel calls {list(outcomes)}, saw {calls}"

    def close(self, got, want, *, grad=False):
        """``got`` (this path's dtype) against a float64 ``want``."""
        if self.dtype == torch.float64:
            rtol, atol = (1e-7, 1e-10) if grad else (1e-9, 1e-12)
        elif grad:  # float32 gradients: an absolute bound scaled by the largest entry
            rtol, atol = 0.0, 2e-5 * want.abs().max().item() + 1e-6
        else:
            rtol, atol = 2e-5, 2e-6
        torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)


@pytest.fixture(scope="module", params=["native", "pytorch"])
def path(request):
    """AMAD-KL tests run on both paths, and each asserts which one computed its values."""
    with pytest.MonkeyPatch.context() as mp:
        spy = KernelSpy(amad.losses.amad_kl_per_head)
        mp.setattr(amad.losses, "amad_kl_per_head", spy)
        if request.param == "native":
            if os.environ.get("AMAD_NATIVE_KERNELS", "1") == "0":
                pytest.skip("native kernels turned off by AMAD_NATIVE_KERNELS=0")
            if not any(shutil.which(c) for c in (os.environ.get("CC") or "cc", "gcc", "clang")):
                pytest.skip("no C compiler on this machine: only the PyTorch path can run")
            assert amad.kernels.library() is not None, amad.kernels.unavailable_reason()
            yield Path("native", torch.float32, teacher_grad=False, spy=spy)
        else:
            with amad.kernels.disabled():
                yield Path("pytorch", torch.float64, teacher_grad=True, spy=spy)


# ------------------------------------------------------------------------------------------
# Data helpers
# ------------------------------------------------------------------------------------------


def maps(gen, B, H, Q, K, *, scale=2.0, dtype=torch.float64):
    return torch.softmax(scale * torch.randn(B, H, Q, K, generator=gen, dtype=dtype), dim=-1)


def rand_mask(gen, B, Q, *, allow_empty=True):
    mask = torch.rand(B, Q, generator=gen) < 0.7
    if not allow_empty:
        mask[:, 0] = True
    return mask


def with_garbage_rows(x, mask, gen):
    """Copy of x whose masked rows hold other (valid, different) distributions."""
    garbage = torch.softmax(5 * torch.randn(x.shape, generator=gen, dtype=x.dtype), dim=-1)
    return torch.where(mask[:, None, :, None], x, garbage)


def one_hot_maps(gen, B, H, Q, K):
    idx = torch.randint(0, K, (B, H, Q), generator=gen)
    return torch.nn.functional.one_hot(idx, K).double()


# ------------------------------------------------------------------------------------------
# Naive references (float64, explicit loops)
# ------------------------------------------------------------------------------------------


def naive_row_kl(p, q, eps=EPS):
    return sum(p[k] * (torch.log(p[k] + eps) - torch.log(q[k] + eps)) for k in range(len(p)))


def naive_amad(T, S, mask, *, variant="kl", temperature=1.0, eps=EPS, detach=False):
    """Returns (per_head (B, Ht), weights (B, Ht, Hs)); differentiable for gradient checks."""
    B, Ht, Q, _ = T.shape
    Hs = S.shape[1]
    per_head, weights = [], []
    zero = (T.sum() + S.sum()) * 0  # keeps the graph connected when every row is masked
    for b in range(B):
        rows = [q for q in range(Q) if mask[b, q]]

        def flat(x, h, b=b, rows=rows):
            return torch.cat([x[b, h, q] for q in rows]) if rows else zero[None]

        def norm(v):
            return torch.clamp((v * v).sum(), min=eps * eps).sqrt()

        t = [flat(T, i) for i in range(Ht)]
        s = [flat(S, j) for j in range(Hs)]
        b_heads, b_weights = [], []
        for i in range(Ht):
            cos = [(t[i] * s[j]).sum() / (norm(t[i]) * norm(s[j])) for j in range(Hs)]
            exps = [torch.exp(c / temperature) for c in cos]
            a = [e / sum(exps) for e in exps]
            b_weights.append(torch.stack(a))
            if detach:
                a = [x.detach() for x in a]
            if variant == "kl":
                total = zero
                for q in rows:
                    m = sum(a[j] * S[b, j, q] for j in range(Hs))
                    total = total + naive_row_kl(T[b, i, q], m, eps)
                b_heads.append(total / max(len(rows), 1))
            else:
                diff = t[i] / norm(t[i]) - sum(a[j] * s[j] / norm(s[j]) for j in range(Hs))
                b_heads.append((diff * diff).sum())
        per_head.append(torch.stack(b_heads))
        weights.append(torch.stack(b_weights))
    return torch.stack(per_head), torch.stack(weights)


def naive_masked_row_mean_kl(P, R, mask, b, eps=EPS):
    """mean over valid rows q of KL(P[q] || R[q]) for (Q, K) maps of batch element b."""
    rows = [q for q in range(P.shape[0]) if mask[b, q]]
    if not rows:
        return P.new_zeros(())
    return sum(naive_row_kl(P[q], R[q], eps) for q in rows) / len(rows)


def naive_one_to_one(T, S, mask):
    B, Hs = T.shape[0], S.shape[1]
    return (
        sum(
            sum(naive_masked_row_mean_kl(T[b, k], S[b, k], mask, b) for k in range(Hs))
            for b in range(B)
        )
        / B
    )


def naive_head_mean(T, S, mask):
    B = T.shape[0]
    return sum(naive_masked_row_mean_kl(T[b].mean(0), S[b].mean(0), mask, b) for b in range(B)) / B


def naive_relation(tq, sq, key_mask, heads, eps=EPS):
    B, L, _ = tq.query.shape
    total = 0.0
    for b in range(B):
        valid = [t for t in range(L) if key_mask[b, t]]
        if not valid:
            continue
        for part in ("query", "key", "value"):
            xs = []
            for qkv in (tq, sq):
                x = getattr(qkv, part)[b]
                d = x.shape[-1] // heads
                xs.append([x[:, a * d : (a + 1) * d] for a in range(heads)])
            for a in range(heads):
                for row in valid:
                    rels = []
                    for x in (xs[0][a], xs[1][a]):
                        d = x.shape[-1]
                        scores = torch.stack(
                            [(x[row] * x[col]).sum() / math.sqrt(d) for col in valid]
                        )
                        rels.append(torch.softmax(scores, 0))
                    total = total + naive_row_kl(rels[0], rels[1], eps) / (heads * len(valid))
    return total / B


def rand_qkv(gen, B, L, hidden):
    return QKV(*(torch.randn(B, L, hidden, generator=gen, dtype=torch.float64) for _ in range(3)))


dims = st.integers(1, 4)


# ------------------------------------------------------------------------------------------
# AMAD against the naive reference
# ------------------------------------------------------------------------------------------


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 3),
    Ht=dims,
    Hs=dims,
    Q=dims,
    K=st.integers(1, 5),
    variant=st.sampled_from(["kl", "mse"]),
    temperature=st.sampled_from([0.1, 0.5, 1.0, 3.0]),
    detach=st.booleans(),
)
# Pinned so the detach path is always exercised with several student heads.
@example(seed=0, B=2, Ht=3, Hs=2, Q=3, K=4, variant="kl", temperature=0.5, detach=True)
@example(seed=1, B=2, Ht=2, Hs=3, Q=3, K=4, variant="mse", temperature=0.5, detach=True)
def test_amad_matches_naive_values_and_gradients(
    path, seed, B, Ht, Hs, Q, K, variant, temperature, detach
):
    path.reset()
    gen = torch.Generator().manual_seed(seed)
    T = maps(gen, B, Ht, Q, K, dtype=path.dtype).requires_grad_(path.teacher_grad)
    S = maps(gen, B, Hs, Q, K, dtype=path.dtype).requires_grad_()
    mask = rand_mask(gen, B, Q)
    kw = dict(variant=variant, temperature=temperature, detach_weights=detach)

    # The reference sees the very values the path does, in float64.
    T64, S64 = T.detach().double().requires_grad_(), S.detach().double().requires_grad_()
    want_heads, want_a = naive_amad(
        T64, S64, mask, variant=variant, temperature=temperature, detach=detach
    )
    want_loss = want_heads.sum(1).mean(0)
    want_gT, want_gS = torch.autograd.grad(want_loss, (T64, S64))

    got_loss = amad_loss(T, S, mask, **kw)
    got_grads = torch.autograd.grad(got_loss, (S, T) if path.teacher_grad else (S,))
    path.close(got_loss, want_loss)
    path.close(got_grads[0], want_gS, grad=True)
    if path.teacher_grad:
        path.close(got_grads[1], want_gT, grad=True)
    path.close(amad_loss_per_head(T, S, mask, **kw), want_heads)
    path.close(align_weights(T, S, mask, temperature=temperature), want_a)
    path.expect(*[path.kl] * 2 if variant == "kl" else ())  # the mse variant has no kernel


def test_amad_pinned_constant(path):
    # Hand-checkable case: one teacher head equal to student head 0, orthogonal to student head 1.
    # cos = (1, 0) -> a = softmax(1, 0) = (e/(e+1), 1/(e+1)); M = a0 * I + a1 * swap.
    T = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]], dtype=path.dtype)
    S = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]]], dtype=path.dtype)
    rel = 1e-12 if path.dtype == torch.float64 else 1e-6
    a0 = math.e / (math.e + 1)
    want_kl = math.log(1 + EPS) - math.log(a0 + EPS)  # same for both rows
    assert amad_loss(T, S).item() == pytest.approx(want_kl, rel=rel)
    path.expect(path.kl)
    # mse: || t - a0 t - a1 s1 ||^2 with unit t, s1 orthogonal -> a1^2 + a1^2
    a1 = 1 - a0
    assert amad_loss(T, S, variant="mse").item() == pytest.approx(2 * a1**2, rel=rel)
    path.expect()


def test_float32_and_half_inputs_are_supported(path):
    gen = torch.Generator().manual_seed(0)
    T, S = maps(gen, 2, 3, 4, 5), maps(gen, 2, 2, 4, 5)
    want = amad_loss(T, S)
    path.expect(DECLINED)  # float64 maps: the kernel computes in float32 only, so it declines
    got32 = amad_loss(T.float(), S.float())
    got16 = amad_loss(T.half(), S.bfloat16())
    path.expect(path.kl, path.kl)
    assert got32.dtype == torch.float32 and got16.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got16.double(), want, rtol=5e-2, atol=1e-2)


@pytest.mark.parametrize("variant", ["kl", "mse"])
def test_autocast_does_not_lower_the_precision(path, variant):
    # Under autocast, matmuls would run in bf16; the losses keep computing in float32.
    gen = torch.Generator().manual_seed(0)
    T, S = maps(gen, 2, 3, 4, 5, dtype=torch.float32), maps(gen, 2, 2, 4, 5, dtype=torch.float32)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    S = S.requires_grad_()
    want = amad_loss(T, S, mask, variant=variant)
    (want_grad,) = torch.autograd.grad(want, S)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = amad_loss(T, S, mask, variant=variant)
        weights = align_weights(T, S, mask)
    (got_grad,) = torch.autograd.grad(got, S)  # backward outside autocast, as PyTorch advises
    path.expect(*[path.kl] * 2 if variant == "kl" else ())
    assert got.dtype == torch.float32 and weights.dtype == torch.float32
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    torch.testing.assert_close(weights, align_weights(T, S, mask))


# ------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 3),
    Ht=dims,
    Hs=dims,
    Q=dims,
    K=st.integers(1, 5),
    variant=st.sampled_from(["kl", "mse"]),
)
def test_nonnegative_and_student_permutation_invariant(path, seed, B, Ht, Hs, Q, K, variant):
    path.reset()
    gen = torch.Generator().manual_seed(seed)
    T, S = maps(gen, B, Ht, Q, K, dtype=path.dtype), maps(gen, B, Hs, Q, K, dtype=path.dtype)
    mask = rand_mask(gen, B, Q)
    per_head = amad_loss_per_head(T, S, mask, variant=variant)
    # eps inside the logs can push a KL below 0 by at most about K * eps (plus float32 rounding).
    rounding = 0.0 if path.dtype == torch.float64 else 1e-6
    assert (per_head >= -K * EPS - rounding).all()
    perm = torch.randperm(Hs, generator=gen)
    torch.testing.assert_close(amad_loss_per_head(T, S[:, perm], mask, variant=variant), per_head)
    path.expect(*[path.kl] * 2 if variant == "kl" else ())


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    Ht=dims,
    Hs=dims,
    Q=dims,
    K=st.integers(1, 5),
    variant=st.sampled_from(["kl", "mse"]),
)
def test_teacher_permutation_permutes_per_head_terms(path, seed, Ht, Hs, Q, K, variant):
    path.reset()
    gen = torch.Generator().manual_seed(seed)
    T, S = maps(gen, 2, Ht, Q, K, dtype=path.dtype), maps(gen, 2, Hs, Q, K, dtype=path.dtype)
    mask = rand_mask(gen, 2, Q)
    perm = torch.randperm(Ht, generator=gen)
    base = amad_loss_per_head(T, S, mask, variant=variant)
    torch.testing.assert_close(
        amad_loss_per_head(T[:, perm], S, mask, variant=variant), base[:, perm]
    )
    torch.testing.assert_close(
        align_weights(T[:, perm], S, mask), align_weights(T, S, mask)[:, perm]
    )
    path.expect(*[path.kl] * 2 if variant == "kl" else ())


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 3),
    Ht=dims,
    Hs=dims,
    Q=dims,
    K=st.integers(1, 5),
    variant=st.sampled_from(["kl", "mse"]),
    temperature=st.sampled_from([0.01, 1.0, 10.0]),
)
def test_zero_when_every_head_is_the_same_map(path, seed, B, Ht, Hs, Q, K, variant, temperature):
    path.reset()
    gen = torch.Generator().manual_seed(seed)
    P = maps(gen, B, 1, Q, K, dtype=path.dtype)
    mask = rand_mask(gen, B, Q)
    loss = amad_loss(
        P.expand(B, Ht, Q, K), P.expand(B, Hs, Q, K), mask, variant=variant, temperature=temperature
    )
    # float32: the mixture of identical maps equals each of them to a few roundings.
    assert abs(loss.item()) < (1e-10 if path.dtype == torch.float64 else 1e-5)
    path.expect(*[path.kl] if variant == "kl" else ())


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 2),
    H=st.integers(2, 4),
    Q=st.integers(2, 4),
    K=st.integers(3, 6),
    variant=st.sampled_from(["kl", "mse"]),
)
def test_tends_to_zero_as_temperature_vanishes_for_permuted_heads(path, seed, B, H, Q, K, variant):
    path.reset()
    gen = torch.Generator().manual_seed(seed)
    T = maps(gen, B, H, Q, K, scale=3.0, dtype=path.dtype)
    mask = rand_mask(gen, B, Q, allow_empty=False)
    # Distinct teacher heads are what makes the hard match unique; skip near-duplicates.
    flat = torch.where(mask[:, None, :, None], T, 0).flatten(2)
    unit = flat / flat.norm(dim=-1, keepdim=True)
    cos = unit @ unit.transpose(1, 2) - 2 * torch.eye(H, dtype=T.dtype)
    assume(cos.max().item() < 0.98)
    S = T[:, torch.randperm(H, generator=gen)]
    warm = amad_loss(T, S, mask, variant=variant, temperature=1.0)
    cold = amad_loss(T, S, mask, variant=variant, temperature=1e-3)
    assert warm.item() > 0
    assert cold.item() < 1e-3 * warm.item()
    path.expect(*[path.kl] * 2 if variant == "kl" else ())


@pytest.mark.parametrize("variant", ["kl", "mse"])
@pytest.mark.parametrize("detach", [False, True])
def test_finite_gradients_with_exact_zeros(path, variant, detach):
    gen = torch.Generator().manual_seed(1)
    T = one_hot_maps(gen, 3, 3, 4, 5)
    S = one_hot_maps(gen, 3, 2, 4, 5)
    T[0, 1] = 0.0  # a zero-norm teacher head
    S[1, 0] = 0.0  # a zero-norm student head
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2] = False  # a batch element with no valid row: every head has zero norm
    for dtype in (torch.float32, torch.float64):
        t, s = T.to(dtype).requires_grad_(path.teacher_grad), S.to(dtype).requires_grad_()
        loss = amad_loss(t, s, mask, variant=variant, detach_weights=detach)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(s.grad).all()
        assert not path.teacher_grad or torch.isfinite(t.grad).all()
        assert torch.isfinite(align_weights(t, s, mask)).all()
    # float32 takes this path; float64 always declines the kernel.
    path.expect(*[path.kl, DECLINED] if variant == "kl" else ())


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 3),
    Ht=dims,
    Hs=dims,
    Q=st.integers(2, 5),
    K=st.integers(1, 5),
    variant=st.sampled_from(["kl", "mse"]),
)
def test_masked_rows_change_nothing(path, seed, B, Ht, Hs, Q, K, variant):
    path.reset()
    gen = torch.Generator().manual_seed(seed)
    T, S = maps(gen, B, Ht, Q, K, dtype=path.dtype), maps(gen, B, Hs, Q, K, dtype=path.dtype)
    mask = rand_mask(gen, B, Q)
    T2, S2 = with_garbage_rows(T, mask, gen), with_garbage_rows(S, mask, gen)
    for fn in (
        lambda t, s: amad_loss_per_head(t, s, mask, variant=variant),
        lambda t, s: align_weights(t, s, mask),
        lambda t, s: head_mean_loss(t, s, mask),
        lambda t, s: one_to_one_loss(t[:, : s.shape[1]], s[:, : t.shape[1]], mask),
    ):
        torch.testing.assert_close(fn(T2, S2), fn(T, S))
    # Even NaN padding rows are ignored (they are removed with `where`, never multiplied by 0).
    nan_T = torch.where(mask[:, None, :, None], T, float("nan"))
    torch.testing.assert_close(
        amad_loss(nan_T, S, mask, variant=variant), amad_loss(T, S, mask, variant=variant)
    )
    path.expect(*[path.kl] * 4 if variant == "kl" else ())


# ------------------------------------------------------------------------------------------
# Shapes promised by the docstrings
# ------------------------------------------------------------------------------------------


def _returns_section(fn):
    return fn.__doc__.split("Returns:")[1]


def test_shapes_match_docstrings(path):
    gen = torch.Generator().manual_seed(0)
    B, Ht, Hs, Q, K = 2, 5, 3, 4, 6
    T, S = maps(gen, B, Ht, Q, K, dtype=path.dtype), maps(gen, B, Hs, Q, K, dtype=path.dtype)
    assert "(B, Ht, Hs)" in _returns_section(align_weights)
    assert align_weights(T, S).shape == (B, Ht, Hs)
    assert "(B, Ht)" in _returns_section(amad_loss_per_head)
    assert amad_loss_per_head(T, S).shape == (B, Ht)
    qkv_t, qkv_s = rand_qkv(gen, B, Q, 8), rand_qkv(gen, B, Q, 4)
    zero_dim = {
        amad_loss: lambda: amad_loss(T, S),
        one_to_one_loss: lambda: one_to_one_loss(T, S),
        head_mean_loss: lambda: head_mean_loss(T, S),
        relation_loss: lambda: relation_loss(qkv_t, qkv_s, relation_heads=2),
        logit_kd_loss: lambda: logit_kd_loss(torch.randn(B, 7), torch.randn(B, 7), 2.0),
    }
    for fn, call in zero_dim.items():
        assert "0-dim tensor" in _returns_section(fn), fn.__name__
        assert call().shape == (), fn.__name__
    path.expect(path.kl, path.kl)  # amad_loss_per_head and amad_loss


# ------------------------------------------------------------------------------------------
# No (B, Ht, Hs, Q, K) intermediate
# ------------------------------------------------------------------------------------------


class _RecordShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.shapes.append(tuple(o.shape))
        return out


def _assert_no_pairwise_intermediate(loss_fn, B, Ht, Hs, Q, K, teacher_grad=True):
    gen = torch.Generator().manual_seed(0)
    T = maps(gen, B, Ht, Q, K, dtype=torch.float32).requires_grad_(teacher_grad)
    S = maps(gen, B, Hs, Q, K, dtype=torch.float32).requires_grad_()
    saved = []

    def pack(x):
        saved.append(tuple(x.shape))
        return x

    with _RecordShapes() as rec, torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = loss_fn(T, S)
        loss.backward()
    # numel bound catches broadcasting hidden behind a reshape, not just literal 5-D tensors.
    limit = B * max(Ht, Hs) * Q * K
    for shape in rec.shapes + saved:
        assert len(shape) < 5, f"5-D intermediate {shape}"
        assert math.prod(shape) <= limit, f"intermediate {shape} exceeds B*max(Ht,Hs)*Q*K={limit}"
    assert saved, "the hooks saw nothing: the check would be vacuous"


@pytest.mark.parametrize("variant", ["kl", "mse"])
def test_no_pairwise_intermediate(path, variant):
    _assert_no_pairwise_intermediate(
        lambda t, s: amad_loss(t, s, torch.rand(2, 8) < 0.8, variant=variant),
        2, 6, 4, 8, 16,
        teacher_grad=path.teacher_grad,
    )  # fmt: skip
    path.expect(*[path.kl] if variant == "kl" else ())


def test_pairwise_detector_catches_broadcasting():
    def broadcast_amad(t, s):  # the memory-hungry formulation the real code must avoid
        a = torch.softmax(torch.randn(t.shape[0], t.shape[1], s.shape[1]), -1)
        mix = (a[..., None, None] * s[:, None]).sum(2)
        return (t * (torch.log(t + EPS) - torch.log(mix + EPS))).sum()

    with pytest.raises(AssertionError, match="5-D intermediate"):
        _assert_no_pairwise_intermediate(broadcast_amad, 2, 6, 4, 8, 16)


class _RecordAllocations(TorchDispatchMode):
    """Elements of every new storage an op creates (views of its inputs are not new)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {
            x.untyped_storage().data_ptr()
            for x in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(x, torch.Tensor)
        }
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in given:
                self.sizes.append(o.untyped_storage().nbytes() // o.element_size())
        return out


def _record_outputs(fn):
    """Elements of every storage allocated while ``fn`` runs (forward and backward)."""
    with _RecordAllocations() as rec:
        fn()
    return rec.sizes


@pytest.mark.parametrize("variant", ["kl", "mse"])
def test_amad_allocates_nothing_the_size_of_the_teacher_maps(path, monkeypatch, variant):
    # The memory contract: with finite float32 maps, nothing as large as the teacher maps is
    # allocated (masked student copy, its gradient and per-chunk buffers only).
    import amad.losses as losses

    B, Ht, Hs, Q, K = 4, 6, 2, 5, 7
    monkeypatch.setitem(losses._CHUNK_ELEMENTS, "cpu", Ht * Q * K)  # one batch element per chunk
    gen = torch.Generator().manual_seed(0)
    T = maps(gen, B, Ht, Q, K, dtype=torch.float32)
    S = maps(gen, B, Hs, Q, K, dtype=torch.float32).requires_grad_()
    mask = rand_mask(gen, B, Q, allow_empty=False)
    sizes = _record_outputs(lambda: amad_loss(T, S, mask, variant=variant).backward())
    assert max(sizes) <= max(B * Hs * Q * K, Ht * Q * K) < T.numel()
    path.expect(*[path.kl] if variant == "kl" else ())
    torch.testing.assert_close(
        amad_loss(T.double(), S.double(), mask, variant=variant),
        naive_amad(T.double(), S.double(), mask, variant=variant)[0].sum(1).mean(0),
    )
    path.expect(*[DECLINED] if variant == "kl" else ())  # float64: the kernel declines


@pytest.mark.parametrize("variant", ["kl", "mse"])
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("chunk_elements", [1, 2 * 3 * 4 * 5, 10**9])
def test_pytorch_chunks_match_naive(path, monkeypatch, variant, detach, chunk_elements):
    # The tests above use shapes far below one chunk; here chunks of 1 and 2 batch elements (the
    # last one partial) and a single chunk give the naive values and gradients. Chunking is the
    # PyTorch implementation's: float64 maps and teacher gradients make the kernel decline on
    # both paths.
    import amad.losses as losses

    monkeypatch.setitem(losses._CHUNK_ELEMENTS, "cpu", chunk_elements)
    gen = torch.Generator().manual_seed(3)
    B, Ht, Hs, Q, K = 5, 3, 2, 4, 5
    T = maps(gen, B, Ht, Q, K).requires_grad_()
    S = maps(gen, B, Hs, Q, K).requires_grad_()
    mask = rand_mask(gen, B, Q)
    mask[1] = False  # a batch element with no valid row
    want_heads, _ = naive_amad(T, S, mask, variant=variant, temperature=0.5, detach=detach)
    want_gT, want_gS = torch.autograd.grad(want_heads.sum(1).mean(0), (T, S))
    got = amad_loss_per_head(T, S, mask, variant=variant, temperature=0.5, detach_weights=detach)
    path.expect(*[DECLINED] if variant == "kl" else ())
    got_gT, got_gS = torch.autograd.grad(got.sum(1).mean(0), (T, S))
    torch.testing.assert_close(got, want_heads, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_gT, want_gT, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(got_gS, want_gS, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("variant", ["kl", "mse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "padding", ["distribution", "huge", "inf", "nan", "negative", "zero"], ids=lambda p: p
)
def test_whatever_padding_rows_hold_values_and_gradients_are_the_same(path, variant, dtype, padding):
    # Padding rows that are distributions take the copy-free path (masked rows removed by row
    # weights); inf, NaN, negative or huge values the `where` path. Both must agree with maps
    # whose padding rows are zero, values and student and teacher gradients alike.
    gen = torch.Generator().manual_seed(4)
    B, Ht, Hs, Q, K = 3, 4, 3, 5, 6
    T, S = maps(gen, B, Ht, Q, K, dtype=dtype), maps(gen, B, Hs, Q, K, dtype=dtype)
    mask = rand_mask(gen, B, Q, allow_empty=False)
    rows = mask[:, None, :, None]
    fill = {"huge": 1e30, "inf": math.inf, "nan": math.nan, "negative": -0.5, "zero": 0.0}
    if padding == "distribution":
        T2, S2 = with_garbage_rows(T, mask, gen), with_garbage_rows(S, mask, gen)
    else:
        T2, S2 = torch.where(rows, T, fill[padding]), torch.where(rows, S, fill[padding])

    def run(t, s):
        t, s = t.clone().requires_grad_(path.teacher_grad), s.clone().requires_grad_()
        loss = amad_loss(t, s, mask, variant=variant)
        return (loss, *torch.autograd.grad(loss, (t, s) if path.teacher_grad else (s,)))

    want = run(torch.where(rows, T, 0.0), torch.where(rows, S, 0.0))
    got = run(T2, S2)
    # Padding rows are never read by the kernel, whatever they hold; float64 declines it.
    took = path.kl if dtype == torch.float32 else DECLINED
    path.expect(*[took] * 2 if variant == "kl" else ())
    for got, exp in zip(got, want, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, exp)
    for got_a, want_a in ((align_weights(T2, S2, mask), align_weights(T, S, mask)),):
        torch.testing.assert_close(got_a, want_a)


def test_tiny_eps_takes_the_exact_path_and_stays_finite(path):
    # Padding rows divided by a tiny eps, times a large upstream gradient (loss scaling), would
    # overflow float32 to inf and give inf * 0 = NaN: such maps must not take the copy-free path.
    gen = torch.Generator().manual_seed(5)
    T, S = maps(gen, 2, 3, 4, 5, dtype=torch.float32), maps(gen, 2, 2, 4, 5, dtype=torch.float32)
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    T2 = with_garbage_rows(T, mask, gen)
    S = S.requires_grad_()
    loss = amad_loss(T2, S, mask, eps=1e-30)
    (grad,) = torch.autograd.grad(loss * 1e12, S)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    want = amad_loss(torch.where(mask[:, None, :, None], T, 0.0), S, mask, eps=1e-30)
    (want_grad,) = torch.autograd.grad(want * 1e12, S)
    path.expect(path.kl, path.kl)  # eps = 1e-30 is the smallest the kernel takes
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad, want_grad)


@pytest.mark.parametrize("where", ["valid", "padding"])
def test_value_check_with_a_mask_looks_at_valid_rows_only(path, where):
    gen = torch.Generator().manual_seed(6)
    T, S = maps(gen, 2, 3, 4, 5, dtype=path.dtype), maps(gen, 2, 2, 4, 5, dtype=path.dtype)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    q = 0 if where == "valid" else 3
    for bad in (math.nan, -1e-3):
        for name in ("teacher_attn", "student_attn"):
            t, s = T.clone(), S.clone()
            (t if name == "teacher_attn" else s)[0, 1, q, 2] = bad
            for fn in (
                lambda: amad_loss(t, s, mask),
                lambda: amad_loss(t, s, mask, variant="mse"),
                lambda: align_weights(t, s, mask),
            ):
                if where == "valid":
                    with pytest.raises(ValueError, match=f"{name}.*NaN or negative"):
                        fn()
                else:
                    assert torch.isfinite(fn()).all()
    # NaN or negative values in valid rows: the kernel declines and PyTorch raises the error.
    # In padding rows the kernel never reads them.
    path.expect(*[DECLINED if where == "valid" else path.kl] * 4)


@pytest.mark.parametrize("variant", ["kl", "mse"])
def test_zero_norm_heads_match_naive(path, variant):
    # The mse variant is computed from Gram matrices; eps-floored norms of all-zero heads must
    # give the naive formula's values and gradients (not just finite ones).
    gen = torch.Generator().manual_seed(7)
    T = one_hot_maps(gen, 3, 3, 4, 5)
    S = one_hot_maps(gen, 3, 2, 4, 5)
    T[0, 1] = 0.0
    S[1, 0] = 0.0
    T64, S64 = T.requires_grad_(), S.requires_grad_()
    T = T64.detach().to(path.dtype).requires_grad_(path.teacher_grad)
    S = S64.detach().to(path.dtype).requires_grad_()
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[2] = False
    for detach in (False, True):
        want_heads, _ = naive_amad(T64, S64, mask, variant=variant, detach=detach)
        want_gS, want_gT = torch.autograd.grad(want_heads.sum(1).mean(0), (S64, T64))
        got = amad_loss_per_head(T, S, mask, variant=variant, detach_weights=detach)
        got_g = torch.autograd.grad(got.sum(1).mean(0), (S, T) if path.teacher_grad else (S,))
        path.close(got, want_heads)
        for g, w in zip(got_g, (want_gS, want_gT), strict=False):
            path.close(g, w, grad=True)
    path.expect(*[path.kl] * 2 if variant == "kl" else ())


def test_kernel_declines_what_it_cannot_compute(path):
    # The cases where the PyTorch implementation must run even with the kernel on: float64 maps,
    # a teacher that needs gradients, more than 4096 head pairs, eps below 1e-30, and valid rows
    # holding entries above 1e6 (which PyTorch computes exactly). Each still gives naive values.
    gen = torch.Generator().manual_seed(8)
    T, S = maps(gen, 2, 3, 4, 5, dtype=torch.float32), maps(gen, 2, 2, 4, 5, dtype=torch.float32)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    want, _ = naive_amad(T.double(), S.double(), mask)
    float32 = Path("float32", torch.float32, teacher_grad=False, spy=path.spy)

    float32.close(amad_loss_per_head(T.double(), S.double(), mask), want)
    path.expect(DECLINED)  # float64
    t = T.clone().requires_grad_()
    got = amad_loss_per_head(t, S, mask)
    path.expect(DECLINED)  # the teacher needs a gradient: the kernel differentiates the student only
    float32.close(got, want)
    got.sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    with torch.no_grad():  # ...but with gradients off, that teacher is just maps again
        float32.close(amad_loss_per_head(t, S, mask), want)
    path.expect(path.kl)
    tiny = 1e-35
    want_tiny, _ = naive_amad(T.double(), S.double(), mask, eps=tiny)
    float32.close(amad_loss_per_head(T, S, mask, eps=tiny), want_tiny)
    path.expect(DECLINED)  # eps < 1e-30
    wide_t, wide_s = maps(gen, 1, 65, 2, 3, dtype=torch.float32), maps(gen, 1, 64, 2, 3, dtype=torch.float32)
    want_wide, _ = naive_amad(wide_t.double(), wide_s.double(), torch.ones(1, 2, dtype=torch.bool))
    float32.close(amad_loss_per_head(wide_t, wide_s), want_wide)
    path.expect(DECLINED)  # 65 * 64 head pairs > 4096
    huge = T.clone()
    huge[0, 0, 0, 0] = 2e6
    want_huge, _ = naive_amad(huge.double(), S.double(), mask)
    float32.close(amad_loss_per_head(huge, S, mask), want_huge)
    path.expect(DECLINED)  # an entry above 1e6 in a valid row


# ------------------------------------------------------------------------------------------
# Baselines
# ------------------------------------------------------------------------------------------


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 3),
    Ht=dims,
    Q=dims,
    K=st.integers(1, 5),
    drop=st.integers(0, 3),
)
def test_one_to_one_matches_naive_and_drops_extra_teacher_heads(seed, B, Ht, Q, K, drop):
    Hs = max(1, Ht - drop)
    gen = torch.Generator().manual_seed(seed)
    T, S, mask = maps(gen, B, Ht, Q, K), maps(gen, B, Hs, Q, K), rand_mask(gen, B, Q)
    got = one_to_one_loss(T, S, mask)
    torch.testing.assert_close(got, naive_one_to_one(T[:, :Hs], S, mask))
    T_other = T.clone()
    T_other[:, Hs:] = maps(gen, B, Ht - Hs, Q, K)
    torch.testing.assert_close(one_to_one_loss(T_other, S, mask), got)


def test_one_to_one_rejects_more_student_heads():
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"student_attn.*\(2, 4, 3, 3\).*Hs <= Ht"):
        one_to_one_loss(maps(gen, 2, 3, 3, 3), maps(gen, 2, 4, 3, 3))


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 3),
    Ht=dims,
    Hs=dims,
    Q=dims,
    K=st.integers(1, 5),
)
def test_head_mean_matches_naive(seed, B, Ht, Hs, Q, K):
    gen = torch.Generator().manual_seed(seed)
    T, S, mask = maps(gen, B, Ht, Q, K), maps(gen, B, Hs, Q, K), rand_mask(gen, B, Q)
    torch.testing.assert_close(head_mean_loss(T, S, mask), naive_head_mean(T, S, mask))


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 2),
    L=st.integers(1, 4),
    heads=st.sampled_from([1, 2]),
    ht=st.sampled_from([4, 8]),
    hs=st.sampled_from([2, 6]),
)
def test_relation_matches_naive(seed, B, L, heads, ht, hs):
    gen = torch.Generator().manual_seed(seed)
    tq, sq = rand_qkv(gen, B, L, ht), rand_qkv(gen, B, L, hs)
    mask = rand_mask(gen, B, L)
    got = relation_loss(tq, sq, mask, relation_heads=heads)
    torch.testing.assert_close(
        got, torch.as_tensor(naive_relation(tq, sq, mask, heads), dtype=torch.float64)
    )


def test_relation_zero_for_equal_positive_otherwise_and_hidden_sizes_may_differ():
    gen = torch.Generator().manual_seed(0)
    tq = rand_qkv(gen, 2, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert abs(relation_loss(tq, tq, mask, relation_heads=3).item()) < 1e-12
    assert relation_loss(tq, rand_qkv(gen, 2, 5, 12), mask, relation_heads=3).item() > 1e-3
    assert relation_loss(tq, rand_qkv(gen, 2, 5, 6), mask, relation_heads=3).item() > 1e-3


def test_relation_masked_tokens_do_not_matter_and_all_masked_is_finite():
    gen = torch.Generator().manual_seed(0)
    tq, sq = rand_qkv(gen, 3, 5, 8), rand_qkv(gen, 3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    base = relation_loss(tq, sq, mask, relation_heads=2)

    def scramble(qkv):
        return QKV(
            *(
                torch.where(
                    mask[..., None], x, 100 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
                )
                for x in (qkv.query, qkv.key, qkv.value)
            )
        )

    torch.testing.assert_close(
        relation_loss(scramble(tq), scramble(sq), mask, relation_heads=2), base
    )
    leaves = [x.requires_grad_() for x in (sq.query, sq.key, sq.value)]
    loss = relation_loss(tq, sq, mask, relation_heads=2)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(x.grad).all() for x in leaves)
    assert (sq.query.grad[2] == 0).all()  # the all-masked sequence contributes nothing


def test_logit_kd_matches_naive_and_is_zero_for_equal_logits():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    t = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    T = 2.5
    want = 0.0
    for b in range(3):
        ps = [math.exp(x / T) for x in s[b].tolist()]
        pt = [math.exp(x / T) for x in t[b].tolist()]
        ps, pt = [x / sum(ps) for x in ps], [x / sum(pt) for x in pt]
        want += sum(p * math.log(p / q) for p, q in zip(pt, ps, strict=True)) * T * T / 3
    assert logit_kd_loss(s, t, T).item() == pytest.approx(want, rel=1e-10)
    assert abs(logit_kd_loss(s, s, T).item()) < 1e-12


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------

_g = torch.Generator().manual_seed(0)
_T, _S = maps(_g, 2, 4, 5, 6), maps(_g, 2, 3, 5, 6)
_M = torch.ones(2, 5, dtype=torch.bool)
_QKV8, _QKV6 = rand_qkv(_g, 2, 5, 8), rand_qkv(_g, 2, 5, 6)

BAD_INPUTS = [
    ("teacher rank", lambda: amad_loss(_T[0], _S), "teacher_attn"),
    ("student rank", lambda: amad_loss(_T, _S[..., None]), "student_attn"),
    ("batch", lambda: amad_loss(_T, _S[:1]), r"student_attn has shape \(1, 3, 5, 6\).*batch"),
    (
        "Q/K",
        lambda: amad_loss(_T, maps(_g, 2, 3, 5, 7)),
        re.escape("student_attn has shape (2, 3, 5, 7) but teacher_attn has (2, 4, 5, 6): Q and K"),
    ),
    ("mask shape", lambda: amad_loss(_T, _S, _M[:, :4]), r"query_mask has shape \(2, 4\)"),
    ("mask dtype", lambda: amad_loss(_T, _S, _M.long()), "query_mask"),
    ("teacher NaN", lambda: amad_loss(torch.full_like(_T, float("nan")), _S), "teacher_attn"),
    ("student NaN", lambda: amad_loss(_T, torch.full_like(_S, float("nan"))), "student_attn"),
    ("negative map", lambda: amad_loss(_T, -_S), "student_attn"),
    ("variant", lambda: amad_loss(_T, _S, variant="l2"), "variant"),
    ("temperature 0", lambda: amad_loss(_T, _S, temperature=0.0), "temperature"),
    ("temperature <0", lambda: align_weights(_T, _S, temperature=-1.0), "temperature"),
    ("temperature NaN", lambda: amad_loss(_T, _S, temperature=float("nan")), "temperature"),
    ("eps", lambda: amad_loss(_T, _S, eps=0.0), "eps"),
    ("o2o Hs>Ht", lambda: one_to_one_loss(_S, _T), "student_attn"),
    ("o2o Q/K", lambda: one_to_one_loss(_T, _S[..., :3]), "student_attn"),
    ("head_mean mask", lambda: head_mean_loss(_T, _S, _M[:1]), "query_mask"),
    (
        "head_mean NaN",
        lambda: head_mean_loss(_T, torch.full_like(_S, float("nan"))),
        "student_attn",
    ),
    ("relation heads", lambda: relation_loss(_QKV8, _QKV6, relation_heads=4), "relation_heads"),
    ("relation heads 0", lambda: relation_loss(_QKV8, _QKV8, relation_heads=0), "relation_heads"),
    (
        "relation rank",
        lambda: relation_loss(QKV(_QKV8.query[0], _QKV8.key, _QKV8.value), _QKV6, relation_heads=2),
        "teacher_qkv.query",
    ),
    (
        "relation T",
        lambda: relation_loss(_QKV8, rand_qkv(_g, 2, 4, 6), relation_heads=2),
        "student_qkv.query",
    ),
    ("relation mask", lambda: relation_loss(_QKV8, _QKV6, _M[:, :3], relation_heads=2), "key_mask"),
    (
        "kd shape",
        lambda: logit_kd_loss(torch.randn(2, 5), torch.randn(2, 4), 1.0),
        "teacher_logits",
    ),
    ("kd rank", lambda: logit_kd_loss(torch.randn(5), torch.randn(5), 1.0), "student_logits"),
    (
        "kd temperature",
        lambda: logit_kd_loss(torch.randn(2, 5), torch.randn(2, 5), 0),
        "temperature",
    ),
]


@pytest.mark.parametrize(
    "call, match", [(c, m) for _, c, m in BAD_INPUTS], ids=[name for name, _, _ in BAD_INPUTS]
)
def test_bad_input_raises_value_error_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
