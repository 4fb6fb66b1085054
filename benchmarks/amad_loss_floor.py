"""What ``amad_loss`` costs per mapped layer, three ways, against the 1.10x budget.

Run from the repository root (about a minute on 2 cores, most of it torch.compile; ``--quick`` is a
seconds-long smoke run without compilation):

    .venv/bin/python benchmarks/amad_loss_floor.py
    .venv/bin/python benchmarks/amad_loss_floor.py --quick --out /tmp/floor.json

``benchmarks/loss_overhead.py`` measures whole steps; this script isolates the AMAD loss of one
mapped layer at the same shapes (default teacher: 12 heads, ``T = 53`` tokens of which the 4 last
text positions are padding for every example, batch 64; student 4 heads) and times forward +
backward (gradient to the student maps) three ways, medians of interleaved repeats:

* ``shipped``: :func:`amad.losses.amad_loss` as it runs: the fused native kernel
  (:mod:`amad.kernels`) where it is available.
* ``pytorch``: the same call with the kernel turned off (:func:`amad.kernels.disabled`): the
  PyTorch implementation (hand-written chunked forward/backward).
* ``compiled``: the same loss written as plain tensor code (masked maps, Gram-matrix cosines, the
  mixture, the KL) and compiled by ``torch.compile`` (Inductor fuses the element-wise chains into
  single C++ loops and derives the backward). Its value and gradient are checked against
  ``shipped``. Skipped with ``--no-compile``.
* ``one_pass``: a single read-and-write pass over one teacher layer's maps (``torch.add``), the
  memory-traffic unit that any exact implementation pays several times (the maps are read for the
  cosines and again for the KL, and the mixture ``M`` is as large as the teacher maps).

If ``--step-json`` (default ``benchmarks/results/loss_overhead.json``) exists, the table also shows
the budget that the 1.10x target leaves per mapped layer: ``0.10 x step_ms["logit_kd"] / layers``.
Writes ``benchmarks/results/amad_loss_floor.json``. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import amad  # noqa: F401
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

import torch

import amad.kernels
from amad.losses import amad_loss

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "amad_loss_floor.json"
DEFAULT_STEP_JSON = ROOT / "benchmarks" / "results" / "loss_overhead.json"
TARGET_RATIO = 1.10
TEXT_TOKENS = 16  # the benchmark's max question length
EPS = 1e-8


def plain_amad_loss(t: torch.Tensor, s: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """AMAD-KL (temperature 1) in plain tensor ops: what ``torch.compile`` gets to fuse.

    ``t``: ``(B, Ht, T, T)``, ``s``: ``(B, Hs, T, T)``, ``query_mask``: ``(B, T)`` bool. Same value
    as :func:`amad.losses.amad_loss` with its defaults.
    """
    rows = query_mask.to(t.dtype)
    row_weight = rows / rows.sum(-1, keepdim=True).clamp_min(1)
    tm, sm = t * rows[:, None, :, None], s * rows[:, None, :, None]
    tf, sf = tm.flatten(2), sm.flatten(2)
    cos = torch.bmm(tf, sf.transpose(1, 2))
    cos = cos / (tf.square().sum(-1).clamp_min(EPS * EPS).sqrt()[:, :, None]
                 * sf.square().sum(-1).clamp_min(EPS * EPS).sqrt()[:, None, :])
    a = torch.softmax(cos, -1)  # (B, Ht, Hs), paper Eq. 2
    mixture = torch.einsum("bij,bjqk->biqk", a, sm + EPS)
    kl_rows = (tm * torch.log((tm + EPS) / mixture)).sum(-1)  # (B, Ht, T), paper Eq. 9
    return (kl_rows * row_weight[:, None, :]).sum(-1).sum(1).mean(0)


def make_inputs(batch: int, teacher_heads: int, student_heads: int, tokens: int, padding: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = torch.softmax(3 * torch.randn(batch, teacher_heads, tokens, tokens, generator=g), -1)
    s = torch.softmax(3 * torch.randn(batch, student_heads, tokens, tokens, generator=g), -1)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    text = min(TEXT_TOKENS, tokens)  # text comes first in ViLT's sequence; padding ends it
    mask[:, max(0, text - padding) : text] = False
    return t, s.requires_grad_(), mask


def fwd_bwd(loss_fn, t, s, mask):
    def run():
        s.grad = None
        loss_fn(t, s, mask).backward()
    return run


def interleaved_medians(candidates: dict, repeats: int, warmup: int) -> dict[str, float]:
    for run in candidates.values():
        for _ in range(warmup):
            run()
    samples = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: sorted(v)[len(v) // 2] for name, v in samples.items()}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--teacher-heads", type=int, default=12)
    parser.add_argument("--student-heads", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=53, help="T = text + 1 + patches")
    parser.add_argument("--padding", type=int, default=4, help="padded text rows per example")
    parser.add_argument("--mapped-layers", type=int, default=2, help="layers the objective maps")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, help="torch threads; default: all cores")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--quick", action="store_true", help="batch 4, 3 repeats, no compile")
    parser.add_argument("--step-json", default=str(DEFAULT_STEP_JSON))
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.repeats, args.no_compile = 4, 3, True
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t, s, mask = make_inputs(args.batch_size, args.teacher_heads, args.student_heads, args.tokens, args.padding)
    candidates = {"shipped": fwd_bwd(amad_loss, t, s, mask)}
    pytorch = fwd_bwd(amad_loss, t, s, mask)

    def pytorch_path():
        with amad.kernels.disabled():
            pytorch()

    candidates["pytorch"] = pytorch_path
    check = {}
    if not args.no_compile:
        compiled = torch.compile(plain_amad_loss, dynamic=False)
        start = time.perf_counter()
        value = compiled(t, s, mask)
        value.backward()
        check["compile_s"] = time.perf_counter() - start
        grad_compiled, s.grad = s.grad.clone(), None
        reference = amad_loss(t, s, mask)
        reference.backward()
        check["value_rel_diff"] = abs(value.item() - reference.item()) / abs(reference.item())
        check["grad_max_abs_diff"] = (grad_compiled - s.grad).abs().max().item()
        candidates["compiled"] = fwd_bwd(compiled, t, s, mask)
    teacher_maps = t.clone()
    candidates["one_pass"] = lambda: torch.add(teacher_maps, EPS, out=teacher_maps)
    ms = interleaved_medians(candidates, args.repeats, warmup=2)

    budget = None
    step_json = Path(args.step_json)
    if step_json.is_file():
        logit_kd = json.loads(step_json.read_text())["step_ms"]["logit_kd"]
        budget = (TARGET_RATIO - 1) * logit_kd / args.mapped_layers
    results = {
        "ms_per_layer_fwd_bwd": ms,
        "passes_per_layer": {k: v / ms["one_pass"] for k, v in ms.items()},
        "budget_ms_per_layer": budget,
        "budget_source": str(step_json) if budget is not None else None,
        "check": check,
        "config": {
            **{k: v for k, v in vars(args).items() if k not in ("out", "step_json")},
            "threads": torch.get_num_threads(),
            "native_kernels": str(amad.kernels.library().path) if amad.kernels.library() else amad.kernels.unavailable_reason(),
            "torch": torch.__version__,
            "machine": platform.machine(),
        },
    }
    print(f"AMAD loss, one mapped layer, fwd+bwd: B={args.batch_size} Ht={args.teacher_heads} "
          f"Hs={args.student_heads} T={args.tokens}, {torch.get_num_threads()} threads")
    print(f"{'variant':10} | {'ms':>7} | one-pass units")
    for name, value in ms.items():
        print(f"{name:10} | {value:7.2f} | {results['passes_per_layer'][name]:6.1f}")
    if budget is not None:
        print(f"budget per mapped layer for AMAD <= {TARGET_RATIO:.2f} x logit-KD step: {budget:.2f} ms "
              f"(from {step_json.name}, {args.mapped_layers} mapped layers)")
    if check:
        print(f"compiled vs shipped: value rel diff {check['value_rel_diff']:.1e}, grad max abs diff "
              f"{check['grad_max_abs_diff']:.1e}, compile {check['compile_s']:.1f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
