"""What an attention-distillation loss adds to a training step, and what AMAD's loss holds in memory.

Run from the repository root (takes a few minutes on 2 cores; ``--quick`` is a few-second smoke run):

    .venv/bin/python benchmarks/loss_overhead.py
    .venv/bin/python benchmarks/loss_overhead.py --quick --threads 1 --out /tmp/lo.json
    .venv/bin/python benchmarks/loss_overhead.py --device cuda --allocator training   # on a GPU

**Step time.** One distillation step is: teacher forward under ``no_grad`` (eval mode) + student
forward + :class:`~amad.objective.DistillationObjective` + backward + grad-norm clip + AdamW step,
for each method:

* ``task``: cross-entropy only (``method="none"``, both distillation weights 0): no teacher forward.
* ``logit_kd``: task + logit KD; the teacher runs without returning attention maps.
* ``amad``: task + logit KD + AMAD (KL, temperature 1, ``layer_map="uniform"``).
* ``one_to_one``, ``head_mean``: task + logit KD + that attention baseline, same layer map.
* ``relation``: task + logit KD + MiniLMv2 relations (both forwards with ``need_qkv=True``).
* ``amad_pytorch``: ``amad`` with the native kernel turned off (:func:`amad.kernels.disabled`): the
  PyTorch implementation of the same loss, to show what the kernel buys.

Each method trains its own copy of the student (same seed) with its own optimizer. The machine may
be shared and noisy, so methods are interleaved round-robin within every step (the order rotates
each round) on the same pre-built batch, and the table reports the median and p10/p90 of the
per-step wall time. ``ratio_amad_vs_logit_kd`` is median(amad) / median(logit_kd) from the same run;
the median of the per-round paired ratios is reported beside it as a noise check. Nothing here
asserts on time: the target (AMAD step <= 1.10 x logit-KD step) is reported, not enforced.

**Device.** ``--device cuda`` puts the models, optimizers and batches on the GPU and synchronises
before every clock read, so each phase's time includes its kernels (fp32, no autocast: the same
arithmetic as on CPU). The native AMAD kernel is CPU-only, so there ``amad`` and ``amad_pytorch``
run the same PyTorch path. The memory figures below are always measured on CPU.

**Allocator.** The training workers call :func:`pipeline.cpu_allocator.retain_freed_memory` (glibc
keeps freed memory for reuse instead of taking page faults on fresh pages every step), so the main
table is measured that way too. With ``--allocator both`` (the default) the same steps are first
timed with glibc's default settings and reported under ``default_allocator`` in the JSON; the
settings cannot be undone in a process, hence that order.

**Memory of ``amad_loss`` alone**, on teacher ``(B, Ht, T, T)`` and student ``(B, Hs, T, T)`` maps
with the run's batch size, head counts and token count: the peak bytes allocated beyond the inputs
during forward (with and without grad) and forward+backward, divided by the inputs' bytes. Two
independent counters: the CPU allocator as seen by ``torch.profiler`` (``profile_memory=True``,
"Total Allocated" of its memory events; includes kernels' scratch buffers) and a
``TorchDispatchMode`` that sums the bytes of live tensor storages created by each op (tensors only,
but it also gives the bytes still held by the autograd graph after the forward).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import amad  # noqa: F401
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

import numpy as np
import torch
import transformers
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import amad.kernels
from amad.data.benchmark import BenchmarkSpec, benchmark_tokenizer, make_split
from amad.data.scenes import ANSWERS
from amad.losses import amad_loss
from amad.models import StudentSpec, ViltAdapter
from amad.objective import DistillationObjective
from amad.training import make_optimizer
from pipeline.config import TeacherJobConfig, load_config
from pipeline.cpu_allocator import retain_freed_memory
from pipeline.train_teacher import BENCHMARK_FILE

METHODS = ("task", "logit_kd", "amad", "amad_pytorch", "one_to_one", "head_mean", "relation")
TARGET_RATIO = 1.10
TARGET = f"amad step <= {TARGET_RATIO:.2f} x logit_kd step"
DEFAULT_CONFIG = ROOT / "tune_configs" / "teacher.yaml"
DEFAULT_WEIGHTS = ROOT / "weights" / "teacher-default"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "loss_overhead.json"
PHASES = ("teacher_fwd", "student_fwd", "loss", "backward", "optimizer")
DISTINCT_BATCHES = 4  # cycled; the same batch is used by every method within a round

# (normal, --quick) defaults for flags left unset. Quick keeps the teacher's 12 heads and the
# 48 px / 8 px-patch / 16-token shapes (T = 53) but shrinks widths, depth, batch and steps.
DEFAULTS = {
    "student_heads": (4, 4),
    "student_layers": (2, 1),
    "batch_size": (64, 8),
    "steps": (100, 3),
    "warmup": (10, 1),
}
QUICK_TEACHER = {"hidden_size": 48, "layers": 2}


@dataclass(frozen=True)
class Method:
    """One row of the table: an objective and what the forwards must return for it."""

    name: str
    objective: DistillationObjective
    needs_teacher: bool
    attentions: bool
    qkv: bool
    native_kernels: bool = True  # False: amad.kernels.disabled() around the objective


def build_methods(relation_heads: int) -> dict[str, Method]:
    def kd(**settings) -> DistillationObjective:
        weights = {"task_weight": 1.0, "logit_kd_weight": 1.0, "attention_weight": 1.0}
        return DistillationObjective(**{**weights, **settings})

    task_only = DistillationObjective(method="none", logit_kd_weight=0.0, attention_weight=0.0)
    return {
        "task": Method("task", task_only, False, False, False),
        "logit_kd": Method("logit_kd", kd(method="none", attention_weight=0.0), True, False, False),
        "amad": Method("amad", kd(method="amad", amad_temperature=1.0, layer_map="uniform"), True, True, False),
        "amad_pytorch": Method(
            "amad_pytorch", kd(method="amad", amad_temperature=1.0, layer_map="uniform"), True, True, False, False
        ),
        "one_to_one": Method("one_to_one", kd(method="one_to_one", layer_map="uniform"), True, True, False),
        "head_mean": Method("head_mean", kd(method="head_mean", layer_map="uniform"), True, True, False),
        "relation": Method("relation", kd(method="relation", relation_heads=relation_heads), True, False, True),
    }


def pick_relation_heads(requested: int, *hidden_sizes: int) -> int:
    """The largest divisor of every hidden size that is <= ``requested`` (MiniLMv2's ``A``)."""
    common = math.gcd(*hidden_sizes)
    return max(a for a in range(1, min(requested, common) + 1) if common % a == 0)


# ------------------------------------------------------------------------------------------
# Setup: models and data
# ------------------------------------------------------------------------------------------


def load_teacher(args) -> tuple[nn.Module, BenchmarkSpec, str]:
    """The default teacher and its data spec: saved weights when present (not with --quick), else
    random weights for the teacher YAML."""
    cfg = load_config(args.teacher_config, TeacherJobConfig)
    weights = Path(args.teacher_weights)
    if not args.quick and (weights / "config.json").is_file():
        teacher = ViltAdapter.load(weights)
        vocab = benchmark_tokenizer().get_vocab_size()
        if teacher.config.num_labels != len(ANSWERS) or teacher.config.vocab_size < vocab:
            raise ValueError(f"{weights} does not fit the built-in benchmark (answers or vocabulary differ)")
        saved_spec = weights / BENCHMARK_FILE  # the data spec `amad teacher` saved beside the weights
        if saved_spec.is_file():
            return teacher, BenchmarkSpec.from_dict(json.loads(saved_spec.read_text())), str(weights)
        return teacher, cfg.data.benchmark_spec(), str(weights)
    model_cfg = cfg.model.model_copy(update=QUICK_TEACHER) if args.quick else cfg.model
    config = ViltAdapter.teacher_config(
        vocab_size=benchmark_tokenizer().get_vocab_size(),
        answers=ANSWERS,
        image_size=cfg.data.scene.image_size,
        patch_size=model_cfg.patch_size,
        max_text_length=cfg.data.max_question_length,
        hidden_size=model_cfg.hidden_size,
        heads=model_cfg.heads,
        layers=model_cfg.layers,
        intermediate_size=model_cfg.intermediate_size,
        initializer_range=model_cfg.initializer_range,
        dropout=model_cfg.dropout,
    )
    source = f"random init ({'quick, ' if args.quick else ''}{args.teacher_config})"
    return ViltAdapter.build(config, seed=0), cfg.data.benchmark_spec(), source


def make_batches(spec: BenchmarkSpec, batch_size: int, count: int) -> list[dict[str, torch.Tensor]]:
    """``count`` distinct training batches of the benchmark, built before any timing."""
    scenes = math.ceil(batch_size * count / spec.questions_per_scene)
    split = make_split(replace(spec, train_scenes=scenes), "train", benchmark_tokenizer())
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))
    return [split.batch(order[i * batch_size : (i + 1) * batch_size]) for i in range(count)]


class StudentRun:
    """One student + optimizer trained by one method; :meth:`step` returns per-phase seconds."""

    def __init__(self, method: Method, student_config, lr: float = 1e-4, device: str = "cpu"):
        self.method = method
        self.model = ViltAdapter.build(student_config, seed=1).to(device).train()
        self.optimizer = make_optimizer(self.model, lr, 0.01)
        self.device = torch.device(device)

    def step(self, teacher: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        m, clock = self.method, (synchronized_clock if self.device.type == "cuda" else time.perf_counter)
        t0 = clock()
        if m.needs_teacher:
            with torch.no_grad():
                t_out = ViltAdapter.forward(teacher, batch, need_attentions=m.attentions, need_qkv=m.qkv)
        t1 = clock()
        s_out = ViltAdapter.forward(self.model, batch, need_attentions=m.attentions, need_qkv=m.qkv)
        t2 = clock()
        # `task` has no teacher: the objective still evaluates logit KD (weight 0, under no_grad) for
        # its report, so it is handed the student's own outputs in the teacher's place.
        with contextlib.nullcontext() if m.native_kernels else amad.kernels.disabled():
            loss = m.objective(t_out if m.needs_teacher else s_out, s_out, batch["labels"])["loss"]
        t3 = clock()
        loss.backward()
        t4 = clock()
        nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t5 = clock()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{m.name}: loss became {loss.item()}")
        return dict(zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)))


def synchronized_clock() -> float:
    """``time.perf_counter`` once the GPU's queued kernels are done (CUDA runs asynchronously)."""
    torch.cuda.synchronize()
    return time.perf_counter()


# ------------------------------------------------------------------------------------------
# Step timing
# ------------------------------------------------------------------------------------------


def time_steps(
    teacher: nn.Module, runs: dict[str, StudentRun], batches, *, steps: int, warmup: int
) -> dict[str, list[dict]]:
    """Round-robin: every round runs one step of every method on the same batch, order rotated."""
    names = list(runs)
    samples: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(warmup + steps):
        shift = round_index % len(names)
        batch = batches[round_index % len(batches)]
        for name in names[shift:] + names[:shift]:
            phases = runs[name].step(teacher, batch)
            if round_index >= warmup:
                samples[name].append(phases)
    return samples


def summarize(samples: dict[str, list[dict]]) -> dict:
    """Medians and p10/p90 of the step time in ms per method, phase medians, paired AMAD ratio."""
    total = {name: np.array([sum(p.values()) for p in rows]) * 1e3 for name, rows in samples.items()}
    summary = {
        "step_ms": {n: float(np.median(v)) for n, v in total.items()},
        "step_ms_p10": {n: float(np.percentile(v, 10)) for n, v in total.items()},
        "step_ms_p90": {n: float(np.percentile(v, 90)) for n, v in total.items()},
        "phase_ms": {
            n: {ph: float(np.median([p[ph] for p in rows]) * 1e3) for ph in PHASES}
            for n, rows in samples.items()
        },
    }
    base = summary["step_ms"]["logit_kd"]
    summary["ratio_vs_logit_kd"] = {n: v / base for n, v in summary["step_ms"].items()}
    summary["ratio_amad_vs_logit_kd"] = summary["ratio_vs_logit_kd"]["amad"]
    summary["ratio_amad_vs_logit_kd_paired_median"] = float(np.median(total["amad"] / total["logit_kd"]))
    return summary


# ------------------------------------------------------------------------------------------
# Memory of amad_loss
# ------------------------------------------------------------------------------------------


class LiveTensorBytes(TorchDispatchMode):
    """Sums the bytes of live storages created by ops run under it; keeps the peak.

    Storages that already exist (the inputs, and views of them) are not counted; a storage is
    subtracted when it is freed (PyTorch keeps one Python object per storage, so a weak reference
    to it dies exactly then).
    """

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.live = self.peak = 0
        self._known = {t.untyped_storage()._cdata for t in existing}
        self._refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = storage._cdata
        if key in self._known:
            return
        self._known.add(key)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        self._refs.append(weakref.ref(storage, lambda _ref, key=key, size=size: self._free(key, size)))

    def _free(self, key: int, size: int) -> None:
        self.live -= size
        self._known.discard(key)


def allocator_peak(fn) -> int:
    """Peak CPU-allocator bytes allocated while ``fn`` runs, beyond what was allocated before."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    cpu = 0  # "Device Type" of the CPU in the trace
    memory = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == cpu]
    if not memory:
        return 0
    # "Total Allocated" counts from the profiler's start; the first event's value before it is the base.
    base = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(0, max(m["Total Allocated"] for m in memory) - base)


def amad_inputs(batch: int, teacher_heads: int, student_heads: int, text: int, tokens: int):
    gen = torch.Generator().manual_seed(0)
    teacher = torch.softmax(torch.randn(batch, teacher_heads, tokens, tokens, generator=gen), -1)  # (B, Ht, T, T)
    student = torch.softmax(torch.randn(batch, student_heads, tokens, tokens, generator=gen), -1)  # (B, Hs, T, T)
    lengths = torch.randint(text // 2, text + 1, (batch,), generator=gen)
    mask = torch.ones(batch, tokens, dtype=torch.bool)  # (B, T): padded question tokens are False
    mask[:, :text] = torch.arange(text)[None, :] < lengths[:, None]
    return teacher, student.requires_grad_(), mask


def measure_amad_memory(batch: int, teacher_heads: int, student_heads: int, text: int, tokens: int) -> dict:
    """Peak extra bytes of ``amad_loss`` (KL, defaults) relative to its inputs' bytes."""
    teacher, student, mask = amad_inputs(batch, teacher_heads, student_heads, text, tokens)
    input_bytes = teacher.nbytes + student.nbytes + mask.nbytes

    def forward_no_grad():
        with torch.no_grad():
            amad_loss(teacher, student, mask)

    def forward():
        amad_loss(teacher, student, mask)

    def forward_backward():
        amad_loss(teacher, student, mask).backward()
        student.grad = None

    figures = {}
    forward_backward()  # warm-up: first calls allocate one-off buffers
    phases = {"forward_no_grad": forward_no_grad, "forward": forward, "forward_backward": forward_backward}
    for name, fn in phases.items():
        peak = allocator_peak(fn)
        with LiveTensorBytes([teacher, student, mask]) as tracker:
            if name == "forward":
                loss = amad_loss(teacher, student, mask)
                held = tracker.live  # what the autograd graph keeps for backward
                del loss
            else:
                fn()
        figures[name] = {
            "peak_extra_bytes": peak,
            "ratio": peak / input_bytes,
            "tensor_peak_extra_bytes": tracker.peak,
            "tensor_ratio": tracker.peak / input_bytes,
        }
        if name == "forward":
            figures[name]["held_for_backward_bytes"] = held
    return {
        "function": "amad_loss(variant='kl', temperature=1.0)",
        "shapes": {
            "teacher": [batch, teacher_heads, tokens, tokens],
            "student": [batch, student_heads, tokens, tokens],
        },
        "input_bytes": input_bytes,
        **figures,
        "method": "peak_extra_bytes: torch.profiler CPU allocator (profile_memory=True); "
        "tensor_*: TorchDispatchMode summing live op-output storages",
    }


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------


def format_table(summary: dict, methods: dict[str, Method]) -> str:
    lines = [f"{'method':<13} {'median ms':>10} {'p10':>8} {'p90':>8} {'vs logit_kd':>12}  teacher forward"]
    for name, method in methods.items():
        teacher = "maps" if method.attentions else "q/k/v" if method.qkv else "logits"
        teacher = teacher if method.needs_teacher else "none (skipped)"
        lines.append(
            f"{name:<13} {summary['step_ms'][name]:>10.1f} {summary['step_ms_p10'][name]:>8.1f} "
            f"{summary['step_ms_p90'][name]:>8.1f} {summary['ratio_vs_logit_kd'][name]:>11.3f}x  {teacher}"
        )
    return "\n".join(lines)


def format_memory(memory: dict) -> str:
    lines = [f"amad_loss memory, teacher {memory['shapes']['teacher']} + student {memory['shapes']['student']} "
             f"= {memory['input_bytes'] / 2**20:.1f} MiB of inputs; peak extra / input bytes:"]
    for name in ("forward_no_grad", "forward", "forward_backward"):
        f = memory[name]
        lines.append(f"  {name:<17} allocator {f['ratio']:5.2f}x   live tensors {f['tensor_ratio']:5.2f}x")
    held = memory["forward"]["held_for_backward_bytes"]
    lines.append(f"  held by the graph after forward: {held / 2**20:.1f} MiB ({held / memory['input_bytes']:.2f}x)")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student-heads", type=int, help="default 4")
    parser.add_argument("--student-layers", type=int, help="default 2 (quick: 1)")
    parser.add_argument("--batch-size", type=int, help="default 64 (quick: 8)")
    parser.add_argument("--steps", type=int, help="timed steps per method, default 100 (quick: 3)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first, default 10 (quick: 1)")
    parser.add_argument("--threads", type=int, help="torch threads; default: all cores")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the steps run (default: %(default)s); cuda times each phase to its kernels' end")
    parser.add_argument(
        "--relation-heads", type=int, default=8, help="MiniLMv2 relation heads (lowered to divide both hiddens)"
    )
    parser.add_argument("--teacher-config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--teacher-weights", default=str(DEFAULT_WEIGHTS), help="used if it holds config.json")
    parser.add_argument("--quick", action="store_true", help="tiny models, batch 8, 3 steps: a smoke run")
    parser.add_argument(
        "--allocator",
        choices=("both", "training", "default"),
        default="both",
        help="training: glibc keeps freed memory, as the training workers run (the main table); "
        "default: glibc's settings; both: default first (reported under default_allocator), then training",
    )
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)} (logit_kd and amad always run)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results path")
    args = parser.parse_args(argv)
    for name, (normal, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else normal)
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for name in ("student_heads", "student_layers", "batch_size", "steps", "threads", "relation_heads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(METHODS)
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(METHODS)}")
    args.methods = [m for m in METHODS if m in chosen or m in ("logit_kd", "amad")]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher, spec, teacher_source = load_teacher(args)
    teacher.eval().to(args.device)
    student_config = ViltAdapter.student_config(teacher.config, StudentSpec(args.student_heads, args.student_layers))
    relation_heads = pick_relation_heads(args.relation_heads, teacher.config.hidden_size, student_config.hidden_size)
    if relation_heads != args.relation_heads:
        print(f"relation heads: {relation_heads} (asked {args.relation_heads}; must divide both hidden sizes)")
    methods = {name: m for name, m in build_methods(relation_heads).items() if name in args.methods}
    runs = {name: StudentRun(method, student_config, device=args.device) for name, method in methods.items()}
    batches = [{key: value.to(args.device) for key, value in batch.items()}
               for batch in make_batches(spec, args.batch_size, DISTINCT_BATCHES)]
    kernels = amad.kernels.library()

    default_allocator = None
    if args.allocator == "both":
        default_allocator = summarize(time_steps(teacher, runs, batches, steps=args.steps, warmup=args.warmup))
    allocator = "glibc defaults"
    if args.allocator != "default":
        applied, allocator = retain_freed_memory()
        if not applied:
            print(f"allocator: left as it is ({allocator})")
    summary = summarize(time_steps(teacher, runs, batches, steps=args.steps, warmup=args.warmup))
    text = batches[0]["input_ids"].shape[1]
    tokens = text + teacher.vilt.embeddings.position_embeddings.shape[1]  # L + 1 + P
    memory = measure_amad_memory(args.batch_size, teacher.config.num_attention_heads, args.student_heads, text, tokens)

    results = {
        **summary,
        "target": TARGET,
        "meets_target": bool(summary["ratio_amad_vs_logit_kd"] <= TARGET_RATIO),
        "memory": memory,
        "default_allocator": default_allocator,
        "config": {
            "teacher": {
                "source": teacher_source,
                "hidden_size": teacher.config.hidden_size,
                "heads": teacher.config.num_attention_heads,
                "layers": teacher.config.num_hidden_layers,
                "tokens": tokens,
            },
            "student": {
                "hidden_size": student_config.hidden_size,
                "heads": student_config.num_attention_heads,
                "layers": student_config.num_hidden_layers,
            },
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "threads": torch.get_num_threads(),
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "memory_device": "cpu",
            "relation_heads": relation_heads,
            "quick": args.quick,
            "order": "round-robin per step, rotated each round, same batch within a round",
            "allocator": allocator,
            "native_kernels": {
                "library": str(kernels.path) if kernels else None,
                "threaded": bool(kernels and kernels.threaded),
                "unavailable_reason": amad.kernels.unavailable_reason(),
            },
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    print(f"teacher {results['config']['teacher']}, student {results['config']['student']}, "
          f"batch {args.batch_size}, {args.steps} steps after {args.warmup} warm-up, {torch.get_num_threads()} threads, "
          f"on {results['config']['gpu'] or 'cpu'}")
    if default_allocator is not None:
        print("with glibc's default allocator settings:")
        print(format_table(default_allocator, methods))
        print(f"amad / logit_kd = {default_allocator['ratio_amad_vs_logit_kd']:.3f}\n")
        print(f"allocator as in the training workers ({allocator}):")
    print(format_table(summary, methods))
    print(f"amad / logit_kd = {summary['ratio_amad_vs_logit_kd']:.3f} (paired per-round median "
          f"{summary['ratio_amad_vs_logit_kd_paired_median']:.3f}); target {TARGET}: "
          f"{'met' if results['meets_target'] else 'NOT met'}")
    print(format_memory(memory))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
