"""Inference speed and accuracy: teacher and student in PyTorch, student in ONNX Runtime fp32 and int8.

Run from the repository root (a few minutes on 2 cores; ``--quick`` is a smoke run on tiny shapes):

    .venv/bin/python benchmarks/inference.py --student runs/distill/ray/distill-default/epoch_0003
    .venv/bin/python benchmarks/inference.py --quick --out /tmp/inference.json

**Models.** The teacher is ``--teacher`` (default ``weights/teacher-default``). The student is
``--student`` (a checkpoint directory), else the checkpoint a sweep chose (``--sweep-best`` pointing
at a ``best.json``), else a randomly initialised default student (4 heads x 2 layers, head_dim 16, as
``tune_configs/distill.yaml``) whose latency is meaningful but whose accuracy is not (the JSON says
which). The student is exported as ``amad export`` does it (``--exporter``, default dynamo; the ONNX
Runtime-optimised graph when it passes the parity gate and is faster) and quantised to int8 with
ONNX Runtime's dynamic quantisation. Every ONNX variant must pass the fp32 parity gate (int8: none;
its accuracy is reported) before it is timed.

**Measurement.** Validation questions of the teacher's benchmark. Batch-1 latency: p50/p99 over
``--repeats`` single-question calls (each variant interleaved round-robin, so load on a shared machine
hits all alike). Batch-32 throughput: questions per second over ``--repeats`` // 4 batches of 32.
Accuracy: top-1 over the whole validation split (``--quick``: its first 256 questions). PyTorch runs
under ``inference_mode`` in eval mode; torch and ONNX Runtime get the same thread count (``--threads``,
default all cores). Writes ``benchmarks/results/inference.json`` with ``p50_ms``, ``p99_ms``,
``rps_b32`` and ``accuracy`` per variant (``teacher_torch``, ``student_torch``, ``student_ort_fp32``,
``student_ort_int8``) and the ratios the targets are about. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import amad  # noqa: F401
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from amad.data.benchmark import BenchmarkSpec, make_split
from amad.data.text import load_tokenizer
from amad.models import StudentSpec, ViltAdapter
from pipeline import names, onnx_tools

VARIANTS = ("teacher_torch", "student_torch", "student_ort_fp32", "student_ort_int8")
DEFAULT_TEACHER = ROOT / "weights" / "teacher-default"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "inference.json"
DEFAULT_STUDENT = StudentSpec(heads=4, layers=2, head_dim=16)
TARGETS = {
    "ort_fp32_vs_torch_student_b1": "student_ort_fp32 batch-1 p50 >= 2x faster than student_torch",
    "ort_vs_teacher_b1": "student_ort_fp32 batch-1 p50 >= 3x faster than teacher_torch, accuracy within 2 points",
}


def load_student(args, teacher) -> tuple[torch.nn.Module, str]:
    if args.student:
        return ViltAdapter.load(args.student).eval(), str(Path(args.student).resolve())
    if args.sweep_best:
        checkpoint = json.loads(Path(args.sweep_best).read_text())["checkpoint"]
        return ViltAdapter.load(checkpoint).eval(), str(checkpoint)
    config = ViltAdapter.student_config(teacher.config, DEFAULT_STUDENT)
    return ViltAdapter.build(config, seed=0).eval(), "random init (default 4-head student; accuracy not meaningful)"


def torch_runner(model):
    def run(batch):
        with torch.inference_mode():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]).logits.numpy()
    return run


def ort_runner(session):
    def run(batch):
        return session.run([onnx_tools.OUTPUT_NAME], onnx_tools.model_inputs(batch))[0]
    return run


def accuracy(run, split, batch_size: int = 256) -> float:
    logits = np.concatenate([run(batch) for batch in split.batches(batch_size)])
    return float((logits.argmax(-1) == split.labels.numpy()).mean())


def interleaved(runners: dict, batches: list[dict], repeats: int) -> dict[str, list[float]]:
    """Per-variant wall times (ms) of ``repeats`` calls, round-robin over variants, cycling ``batches``."""
    for run in runners.values():  # warm-up: first-call allocations, ORT's lazy initialisation
        for batch in batches[:3]:
            run(batch)
    samples = {name: [] for name in runners}
    for i in range(repeats):
        batch = batches[i % len(batches)]
        order = list(runners.items())
        order = order[i % len(order):] + order[: i % len(order)]
        for name, run in order:
            start = time.perf_counter()
            run(batch)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def build_sessions(student, val, workdir: Path, args) -> tuple[dict, dict]:
    """fp32 (plain or optimised, whichever passes parity and is faster) and int8 sessions; and notes."""
    example = val.batch(torch.arange(2))
    fp32 = onnx_tools.export_onnx(student, workdir / "student.onnx", example, exporter=args.exporter)
    check = [val.batch(torch.arange(min(256, len(val))))]
    expected = onnx_tools.torch_logits(student, check)
    notes = {}

    def parity(session) -> float:
        return float(np.abs(onnx_tools.ort_logits(session, check) - expected).max())

    plain = onnx_tools.open_session(fp32, threads=args.threads)
    notes["parity_fp32"] = parity(plain)
    if notes["parity_fp32"] > 1e-4:
        raise SystemExit(f"the exported student fails the parity gate: max |logit diff| {notes['parity_fp32']:.3g} > 1e-4")
    chosen, chosen_file = plain, fp32
    config = student.config
    how = onnx_tools.optimize_graph(fp32, workdir / "student.opt.onnx", heads=config.num_attention_heads, hidden=config.hidden_size)
    optimized = onnx_tools.open_session(workdir / "student.opt.onnx", threads=args.threads)
    notes["optimizer"] = how
    notes["parity_optimized"] = parity(optimized)
    if notes["parity_optimized"] <= 1e-4:
        one = [val.batch(torch.arange(1))]
        times = interleaved({"plain": ort_runner(plain), "optimized": ort_runner(optimized)}, one, 50)
        if np.median(times["optimized"]) < np.median(times["plain"]):
            chosen, chosen_file = optimized, workdir / "student.opt.onnx"
    notes["fp32_file"] = chosen_file.name
    int8 = onnx_tools.quantize_int8(fp32, workdir / "student.int8.onnx")
    notes["int8_max_abs_logit_diff"] = parity(onnx_tools.open_session(int8, threads=args.threads))
    return {"student_ort_fp32": chosen, "student_ort_int8": onnx_tools.open_session(int8, threads=args.threads)}, notes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(DEFAULT_TEACHER))
    parser.add_argument("--student", default=None, help="a student checkpoint directory")
    parser.add_argument("--sweep-best", default=None, help="a sweep's best.json (its checkpoint is the student)")
    parser.add_argument("--exporter", default="dynamo", choices=onnx_tools.EXPORTERS)
    parser.add_argument("--repeats", type=int, default=200, help="batch-1 calls per variant (batch 32: a quarter)")
    parser.add_argument("--threads", type=int, default=None, help="torch and ORT threads (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="a tiny random teacher, 20 repeats, 256 validation questions")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 20)
        args.exporter = "torchscript"
    return args


def quick_teacher(directory: Path) -> Path:
    """A random teacher in the tiny preset's shape (``--quick``), saved like `amad teacher` saves one."""
    from pipeline import train_teacher
    from pipeline.config import TeacherJobConfig, load_config

    return train_teacher.save_untrained(load_config(ROOT / "tune_configs" / "tiny" / "teacher.yaml", TeacherJobConfig), directory)


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    args.threads = threads
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        teacher_dir = quick_teacher(scratch / "teacher") if args.quick else Path(args.teacher)
        teacher = ViltAdapter.load(teacher_dir).eval()
        spec = BenchmarkSpec.from_dict(json.loads((teacher_dir / names.BENCHMARK_FILE).read_text()))
        val = make_split(spec, "val", load_tokenizer(teacher_dir))
        if args.quick:
            val = val.subset(torch.arange(min(256, len(val))))
        student, student_source = load_student(args, teacher)
        sessions, notes = build_sessions(student, val, scratch, args)
        runners = {
            "teacher_torch": torch_runner(teacher),
            "student_torch": torch_runner(student),
            "student_ort_fp32": ort_runner(sessions["student_ort_fp32"]),
            "student_ort_int8": ort_runner(sessions["student_ort_int8"]),
        }
        acc = {name: accuracy(run, val) for name, run in runners.items()}
        singles = [val.batch(torch.tensor([i])) for i in range(min(64, len(val)))]
        b1 = interleaved(runners, singles, args.repeats)
        b32 = [val.batch(torch.arange(i, i + 32) % len(val)) for i in range(0, 32 * 8, 32)]
        b32_ms = interleaved(runners, b32, max(4, args.repeats // 4))

    p50 = {k: float(np.percentile(v, 50)) for k, v in b1.items()}
    p99 = {k: float(np.percentile(v, 99)) for k, v in b1.items()}
    rps = {k: 32 / (float(np.median(v)) / 1e3) for k, v in b32_ms.items()}
    ratios = {
        "ort_fp32_vs_torch_student_b1": p50["student_torch"] / p50["student_ort_fp32"],
        "ort_fp32_vs_teacher_b1": p50["teacher_torch"] / p50["student_ort_fp32"],
        "accuracy_gap_teacher_minus_ort_fp32": acc["teacher_torch"] - acc["student_ort_fp32"],
    }
    results = {
        "p50_ms": p50,
        "p99_ms": p99,
        "rps_b32": rps,
        "accuracy": acc,
        "ratios": ratios,
        "meets_targets": {
            "ort_fp32_vs_torch_student_b1": ratios["ort_fp32_vs_torch_student_b1"] >= 2.0,
            "ort_vs_teacher_b1": ratios["ort_fp32_vs_teacher_b1"] >= 3.0 and ratios["accuracy_gap_teacher_minus_ort_fp32"] <= 0.02,
        },
        "targets": TARGETS,
        "notes": notes,
        "config": {
            "teacher": "random tiny (quick)" if args.quick else str(Path(args.teacher).resolve()),
            "student": student_source,
            "student_shape": {"heads": student.config.num_attention_heads, "layers": student.config.num_hidden_layers, "hidden": student.config.hidden_size},
            "teacher_shape": {"heads": teacher.config.num_attention_heads, "layers": teacher.config.num_hidden_layers, "hidden": teacher.config.hidden_size},
            "validation_questions": len(val),
            "repeats_b1": args.repeats,
            "threads": threads,
            "exporter": args.exporter,
            "quick": args.quick,
            "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__,
            "machine": platform.machine(),
        },
    }
    print(f"{'variant':17} | {'p50 ms':>7} | {'p99 ms':>7} | {'b32 q/s':>8} | accuracy")
    for name in VARIANTS:
        print(f"{name:17} | {p50[name]:7.2f} | {p99[name]:7.2f} | {rps[name]:8.0f} | {acc[name]:.2%}")
    print(f"student ORT fp32 vs student PyTorch, batch 1: {ratios['ort_fp32_vs_torch_student_b1']:.2f}x (target >= 2x)")
    print(f"student ORT fp32 vs teacher PyTorch, batch 1: {ratios['ort_fp32_vs_teacher_b1']:.2f}x (target >= 3x), "
          f"accuracy gap {ratios['accuracy_gap_teacher_minus_ort_fp32'] * 100:.1f} points (target <= 2)")
    print(f"student: {student_source}; fp32 graph: {notes['fp32_file']} ({notes['optimizer']})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
