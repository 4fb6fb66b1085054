"""Tests for amad.kernels: the fused native AMAD-KL kernel and its build/fallback machinery.

Expected values come from the naive float64 loop implementation in test_losses (never from the
code under test), or from the PyTorch path of amad_loss run in float64.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_losses import maps, naive_amad, rand_mask

import amad.kernels as kernels
from amad.kernels import native_kl
from amad.losses import amad_loss, amad_loss_per_head

ROOT = Path(__file__).resolve().parents[1]
HAS_COMPILER = any(shutil.which(c) for c in (os.environ.get("CC") or "cc", "gcc", "clang"))

if os.environ.get("AMAD_NATIVE_KERNELS", "1") == "0":
    pytest.skip("native kernels turned off by AMAD_NATIVE_KERNELS=0", allow_module_level=True)
if not HAS_COMPILER:
    pytest.skip("no C compiler on this machine: the PyTorch path runs instead", allow_module_level=True)


@pytest.fixture(scope="module")
def lib():
    loaded = kernels.library()
    assert loaded is not None, f"a C compiler is present but the kernels did not build: {kernels.unavailable_reason()}"
    return loaded


def native(T, S, mask, **kw):
    """The native per-head losses; fails the test if the native path declined."""
    kw = {"temperature": 1.0, "eps": 1e-8, "detach_weights": False, **kw}
    out = native_kl.amad_kl_per_head(T, S, mask, **kw)
    assert out is not None, "the native kernel did not apply"
    return out


# ------------------------------------------------------------------------------------------
# The logarithm
# ------------------------------------------------------------------------------------------


def test_log_polynomial_is_within_one_ulp_over_the_normal_floats(lib):
    # Every argument the kernel passes lies in [1e-36, 1e36]; sweep that range densely plus the
    # region around 1, where log((T+eps)/(M+eps)) lives when the student is close.
    x = torch.cat(
        [
            torch.logspace(-37.5, 37.5, 2_000_003, dtype=torch.float64).float(),
            1 + (torch.rand(500_000, generator=torch.Generator().manual_seed(0)) - 0.5) * 1e-2,
            torch.tensor([1.0, 2.0, 0.5, math.sqrt(0.5), math.sqrt(2.0), 1.17549435e-38]),
        ]
    )
    y = torch.empty_like(x)
    lib.lib.amad_log_array(x.data_ptr(), y.data_ptr(), x.numel())
    exact = torch.log(x.double())
    ulp = (torch.nextafter(exact.float().abs(), torch.tensor(math.inf)) - exact.float().abs()).double()
    assert ((y.double() - exact).abs() / ulp).max().item() <= 1.0
    assert y[x == 1.0].eq(0).all()


# ------------------------------------------------------------------------------------------
# Values and gradients against the naive float64 reference
# ------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    B=st.integers(1, 4),
    Ht=st.integers(1, 5),
    Hs=st.integers(1, 9),  # the kernel takes student heads four at a time: 5-9 cover the remainders
    Q=st.integers(1, 9),
    K=st.integers(1, 40),
    temperature=st.sampled_from([1.0, 0.3, 3.0]),
    detach=st.booleans(),
    masked=st.booleans(),
    weighted=st.booleans(),
)
@example(seed=0, B=3, Ht=12, Hs=4, Q=9, K=37, temperature=1.0, detach=False, masked=True, weighted=False)
@example(seed=0, B=3, Ht=12, Hs=4, Q=9, K=37, temperature=1.0, detach=False, masked=True, weighted=True)
@example(seed=1, B=2, Ht=2, Hs=3, Q=1, K=1, temperature=0.3, detach=False, masked=False, weighted=False)
@example(seed=2, B=2, Ht=5, Hs=6, Q=7, K=37, temperature=1.0, detach=False, masked=True, weighted=False)
@example(seed=3, B=2, Ht=3, Hs=9, Q=5, K=19, temperature=0.3, detach=False, masked=True, weighted=True)
def test_native_matches_naive_values_and_gradients(seed, B, Ht, Hs, Q, K, temperature, detach, masked, weighted):
    # weighted: a different upstream gradient per (batch element, head), which the backward kernel
    # recomputes; otherwise one constant, which scales the gradient the forward pass computed.
    gen = torch.Generator().manual_seed(seed)
    T = maps(gen, B, Ht, Q, K)
    S = maps(gen, B, Hs, Q, K)
    mask = rand_mask(gen, B, Q) if masked else None
    ref_mask = mask if masked else torch.ones(B, Q, dtype=torch.bool)
    weights = torch.rand(B, Ht, generator=gen, dtype=torch.float64) if weighted else torch.full((B, Ht), 0.7 / B)
    S64 = S.clone().requires_grad_()
    want, _ = naive_amad(T, S64, ref_mask, temperature=temperature, detach=detach)
    (want_g,) = torch.autograd.grad((want * weights).sum(), S64)

    S32 = S.float().requires_grad_()
    got = native(T.float(), S32, mask, temperature=temperature, detach_weights=detach)
    (got_g,) = torch.autograd.grad((got * weights.float()).sum(), S32)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-6)
    with torch.no_grad():  # the forward kernel without its gradient pass: the same values
        assert torch.equal(native(T.float(), S32, mask, temperature=temperature, detach_weights=detach), got.detach())
    scale = want_g.abs().max().item() + 1e-3
    torch.testing.assert_close(got_g.double(), want_g, rtol=0, atol=2e-5 * scale)


def test_the_default_benchmark_shape_matches_the_pytorch_path_in_float64(lib):
    # The shape loss_overhead.py times: 12 teacher heads, 4 student heads, T = 53, padded text rows.
    gen = torch.Generator().manual_seed(7)
    B, Ht, Hs, T_ = 8, 12, 4, 53
    T = maps(gen, B, Ht, T_, T_, scale=3.0)
    S = maps(gen, B, Hs, T_, T_, scale=3.0)
    mask = torch.ones(B, T_, dtype=torch.bool)
    mask[:, 12:16] = False
    mask[3, :16] = False
    for temperature, detach in ((1.0, False), (0.3, False), (1.0, True)):
        S64 = S.clone().requires_grad_()
        want = amad_loss_per_head(T, S64, mask, temperature=temperature, detach_weights=detach)
        (want_g,) = torch.autograd.grad(want.sum(1).mean(0), S64)
        S32 = S.float().requires_grad_()
        got = native(T.float(), S32, mask, temperature=temperature, detach_weights=detach)
        (got_g,) = torch.autograd.grad(got.sum(1).mean(0), S32)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_g.double(), want_g, rtol=0, atol=1e-5 * want_g.abs().max().item())


def test_a_retained_graph_gives_the_same_gradient_on_every_backward(lib):
    # The first backward scales the forward's gradient in place and hands it on; the second must
    # not see that buffer again (it is recomputed by the backward kernel).
    gen = torch.Generator().manual_seed(5)
    T, S = maps(gen, 3, 6, 7, 11).float(), maps(gen, 3, 4, 7, 11).float()
    mask = rand_mask(gen, 3, 7)
    S.requires_grad_()
    loss = native(T, S, mask, temperature=0.5, detach_weights=False).sum(1).mean(0) * 0.3
    first = torch.autograd.grad(loss, S, retain_graph=True)[0].clone()
    second = torch.autograd.grad(loss, S, retain_graph=True)[0].clone()
    loss.backward()
    with kernels.disabled():
        S64 = S.detach().double().requires_grad_()
        want = amad_loss_per_head(T.double(), S64, mask, temperature=0.5).sum(1).mean(0) * 0.3
        (want_g,) = torch.autograd.grad(want, S64)
    atol = 1e-5 * want_g.abs().max().item()
    for got in (first, second, S.grad):
        torch.testing.assert_close(got.double(), want_g, rtol=0, atol=atol)


def test_amad_loss_takes_the_native_path_for_float32_and_half(lib, monkeypatch):
    calls = []
    real = native_kl._NativeAmadKL.apply
    monkeypatch.setattr(native_kl._NativeAmadKL, "apply", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(0)
    T, S = maps(gen, 2, 3, 4, 5), maps(gen, 2, 2, 4, 5)
    want = amad_loss(T, S)
    assert not calls  # float64 stays on the PyTorch path
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = amad_loss(T.to(dtype), S.to(dtype))
        assert got.dtype == torch.float32
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert len(calls) == 3
    with kernels.disabled():
        assert kernels.library() is None
        amad_loss(T.float(), S.float())
    assert len(calls) == 3 and kernels.library() is lib


def test_padding_rows_are_never_read(lib):
    gen = torch.Generator().manual_seed(2)
    B, Ht, Hs, Q, K = 3, 4, 2, 6, 7
    T, S = maps(gen, B, Ht, Q, K).float(), maps(gen, B, Hs, Q, K).float()
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    rows = mask[:, None, :, None]
    base_S = S.clone().requires_grad_()
    base = native(T, base_S, mask)
    (base_g,) = torch.autograd.grad(base.sum(), base_S)
    # NaN, inf and negative values in padding rows: the kernel would refuse them in valid rows.
    for junk in (math.nan, math.inf, -5.0):
        junk_S = torch.where(rows, S, junk).requires_grad_()
        got = native(torch.where(rows, T, junk), junk_S, mask)
        (got_g,) = torch.autograd.grad(got.sum(), junk_S)
        assert torch.equal(got, base)
        assert torch.equal(got_g, base_g)
    assert base[1].eq(0).all() and base_g[1].eq(0).all()  # no valid row: loss 0, gradient 0
    assert base_g[0, :, 1].eq(0).all() and base_g[0, :, 4].eq(0).all()


def test_the_result_does_not_depend_on_the_thread_count(lib):
    gen = torch.Generator().manual_seed(4)
    T, S = maps(gen, 9, 6, 11, 11).float(), maps(gen, 9, 3, 11, 11).float()
    mask = rand_mask(gen, 9, 11)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            s = S.clone().requires_grad_()
            loss = native(T, s, mask)
            loss.sum().backward()
            results.append((loss, s.grad))
    finally:
        torch.set_num_threads(before)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


# ------------------------------------------------------------------------------------------
# Where the native path hands over to PyTorch
# ------------------------------------------------------------------------------------------


def test_bad_values_in_valid_rows_get_the_pytorch_error(lib):
    gen = torch.Generator().manual_seed(5)
    T, S = maps(gen, 2, 3, 4, 5).float(), maps(gen, 2, 2, 4, 5).float()
    for name, bad_T, bad_S in (
        ("teacher_attn", T.clone().index_put_((torch.tensor(1), torch.tensor(2)), torch.tensor(math.nan)), S),
        ("student_attn", T, S.clone().index_put_((torch.tensor(0), torch.tensor(1)), torch.tensor(-0.1))),
    ):
        assert native_kl.amad_kl_per_head(bad_T, bad_S, None, temperature=1.0, eps=1e-8, detach_weights=False) is None
        with pytest.raises(ValueError, match=f"{name} .*NaN or negative entries"):
            amad_loss(bad_T, bad_S)


def test_huge_or_infinite_values_fall_back_to_the_exact_pytorch_values(lib):
    gen = torch.Generator().manual_seed(6)
    T, S = maps(gen, 2, 3, 4, 5), maps(gen, 2, 2, 4, 5)
    T[0, 1, 2, 3] = 1e7  # not a probability, but finite: the PyTorch path computes it
    assert native_kl.amad_kl_per_head(T.float(), S.float(), None, temperature=1.0, eps=1e-8, detach_weights=False) is None
    torch.testing.assert_close(amad_loss(T.float(), S.float()).double(), amad_loss(T, S), rtol=1e-5, atol=1e-5)


def test_teacher_gradients_and_tiny_eps_use_the_pytorch_path(lib):
    gen = torch.Generator().manual_seed(8)
    T = maps(gen, 2, 3, 4, 5).float().requires_grad_()
    S = maps(gen, 2, 2, 4, 5).float().requires_grad_()
    assert native_kl.amad_kl_per_head(T, S, None, temperature=1.0, eps=1e-8, detach_weights=False) is None
    amad_loss(T, S).backward()
    assert T.grad is not None and T.grad.abs().sum() > 0
    with torch.no_grad():  # no graph: the teacher's requires_grad does not matter
        assert native_kl.amad_kl_per_head(T, S, None, temperature=1.0, eps=1e-8, detach_weights=False) is not None
    assert native_kl.amad_kl_per_head(T.detach(), S, None, temperature=1.0, eps=1e-31, detach_weights=False) is None


# ------------------------------------------------------------------------------------------
# Build, cache and fallback (fresh interpreters)
# ------------------------------------------------------------------------------------------

PROBE = textwrap.dedent(
    """
    import json, torch
    import amad.kernels as k
    from amad.losses import amad_loss
    lib = k.library()
    t = torch.softmax(torch.randn(2, 3, 4, 5), -1)
    s = torch.softmax(torch.randn(2, 2, 4, 5), -1)
    value = amad_loss(t, s).item()
    print(json.dumps({"path": str(lib.path) if lib else None, "threaded": bool(lib and lib.threaded),
                      "reason": k.unavailable_reason(), "finite": value == value}))
    """
)


def run_probe(tmp_path, script=PROBE, **env):
    """Run ``script`` in a fresh interpreter with its own kernel cache: (its last output line, parsed; stderr)."""
    full_env = {**os.environ, "AMAD_KERNEL_CACHE": str(tmp_path / "cache"), **env}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_builds_once_into_the_cache_and_reuses_it(tmp_path):
    first, _ = run_probe(tmp_path)
    assert first["path"] and Path(first["path"]).parent == tmp_path / "cache" and first["finite"]
    assert first["threaded"], "the kernels should share PyTorch's OpenMP runtime on Linux"
    built = Path(first["path"]).stat().st_mtime_ns
    second, _ = run_probe(tmp_path)
    assert second["path"] == first["path"] and Path(first["path"]).stat().st_mtime_ns == built
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_a_broken_compiler_falls_back_to_pytorch_with_a_reason(tmp_path):
    result, stderr = run_probe(tmp_path, CC=shutil.which("false") or "/bin/false")
    assert result["path"] is None and result["finite"]
    assert "could not build amad_kl.c" in result["reason"]
    assert "AMAD native kernels unavailable" in stderr


PORTABLE_PROBE = textwrap.dedent(
    """
    import json, torch
    import amad.kernels as k
    from amad.losses import amad_loss_per_head
    assert k.library() is not None, k.unavailable_reason()
    g = torch.Generator().manual_seed(0)
    t = torch.softmax(3 * torch.randn(5, 6, 23, 23, generator=g, dtype=torch.float64), -1)
    s = torch.softmax(3 * torch.randn(5, 3, 23, 23, generator=g, dtype=torch.float64), -1)
    mask = torch.rand(5, 23, generator=g) < 0.8
    w = torch.rand(5, 6, generator=g, dtype=torch.float64)
    out = {}
    for name, dtype in (("native", torch.float32), ("exact", torch.float64)):
        x = s.to(dtype).requires_grad_()
        loss = amad_loss_per_head(t.to(dtype), x, mask, temperature=0.5)
        (grad,) = torch.autograd.grad((loss * w.to(dtype)).sum(), x)
        out[name] = (loss.double(), grad.double())
    value_err = ((out["native"][0] - out["exact"][0]).abs() / out["exact"][0].abs()).max().item()
    grad_err = ((out["native"][1] - out["exact"][1]).abs().max() / out["exact"][1].abs().max()).item()
    print(json.dumps({"path": str(k.library().path), "threaded": k.library().threaded,
                      "value_err": value_err, "grad_err": grad_err}))
    """
)


def test_a_portable_build_without_openmp_or_native_tuning_gives_the_same_values(tmp_path):
    # What a machine gets when its compiler lacks -march=native or OpenMP (e.g. Apple clang): the
    # generic vector code, single-threaded.
    result, _ = run_probe(tmp_path, PORTABLE_PROBE, AMAD_KERNEL_CFLAGS="-O2")
    assert Path(result["path"]).parent == tmp_path / "cache" and result["threaded"] is False
    assert result["value_err"] < 1e-5 and result["grad_err"] < 1e-5, result


def test_turned_off_by_environment(tmp_path):
    result, stderr = run_probe(tmp_path, AMAD_NATIVE_KERNELS="0")
    assert result == {"path": None, "threaded": False, "reason": None, "finite": True}
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
