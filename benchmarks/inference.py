"""Inference speed and accuracy: teacher and student in PyTorch and in ONNX Runtime fp32, student int8.

Run from the repository root (``--quick`` is a smoke run on tiny shapes):

    .venv/bin/python benchmarks/inference.py                      # the main job's student (runs `make demo`'s stages if needed)
    .venv/bin/python benchmarks/inference.py --student runs/distill/ray/distill-default/epoch_0003
    .venv/bin/python benchmarks/inference.py --quick --out /tmp/inference.json

**Models.** The teacher is ``--teacher`` (default ``weights/teacher-default``). The student is
``--student`` (a checkpoint directory), else the checkpoint a sweep chose (``--sweep-best`` pointing
at a ``best.json``), else **the main job's chosen student**: ``amad run --config
tune_configs/default.yaml --workdir runs/demo`` (``make demo``) is run first, which reuses every stage
that already finished there and runs the rest, so the figures come from a student this repository
rebuilds. ``--quick`` uses a tiny random teacher and a random student (latency only). Teacher and
student are exported alike (``--exporter``, default dynamo; the ONNX Runtime-optimised graph when it
passes the parity gate and is faster); the student is also quantised to int8 with ONNX Runtime's
dynamic quantisation. Every fp32 graph must pass the parity gate (max |logit diff| <= 1e-4) before it is
timed (int8: none; its accuracy is reported).

**Measurement.** Validation questions of the teacher's benchmark. Batch-1 latency: p50/p99 over
``--repeats`` single-question calls (all variants interleaved round-robin, so load on a shared machine
hits all alike). Batch-32 throughput: questions per second over ``--repeats`` // 4 batches of 32.
Accuracy: top-1 over the whole validation split (``--quick``: its first 256 questions). PyTorch runs
under ``inference_mode`` in eval mode; torch and ONNX Runtime get the same thread count (``--threads``,
default 1). Writes ``benchmarks/results/inference.json`` with the exact command, ``p50_ms``,
``p99_ms``, ``rps_b32`` and ``accuracy`` per variant (``teacher_torch``, ``teacher_ort_fp32``,
``student_torch``, ``student_ort_fp32``, ``student_ort_int8``) and the ratios the targets are about;
the speed-up that matters is student vs teacher in the same runtime (``student_vs_teacher_ort_b1``).
Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
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
from amad.models import StudentSpec, ViltAdapter, shape_summary
from pipeline import names, onnx_tools

VARIANTS = ("teacher_torch", "teacher_ort_fp32", "student_torch", "student_ort_fp32", "student_ort_int8")
DEFAULT_TEACHER = ROOT / "weights" / "teacher-default"
DEMO_CONFIG = ROOT / "tune_configs" / "default.yaml"
DEMO_WORKDIR = ROOT / "runs" / "demo"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "inference.json"
DEFAULT_STUDENT = StudentSpec(heads=4, layers=2, head_dim=16)
TARGETS = {
    "student_vs_teacher_ort_b1": "student_ort_fp32 batch-1 p50 <= 0.6x teacher_ort_fp32's, accuracy >= teacher's - 5 points",
    "ort_fp32_vs_torch_student_b1": "student_ort_fp32 batch-1 p50 >= 2x faster than student_torch",
}


def demo_student(workdir: Path) -> tuple[str, str]:
    """The main job's chosen student: ``amad run`` on the default config (finished stages are reused,
    missing ones run), then the sweep's checkpoint from its state file. Returns (checkpoint, source)."""
    command = [sys.executable, "-m", "pipeline.cli", "run", "--config", str(DEMO_CONFIG), "--workdir", str(workdir)]
    print("student: the main job's choice; running", " ".join(command[2:]), "(reuses finished stages)", flush=True)
    done = subprocess.run(command, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"the main job failed (exit {done.returncode}); fix it or pass --student")
    state = json.loads((workdir / "pipeline_state.json").read_text())
    checkpoint = state["sweep"]["result"]["checkpoint"]
    return checkpoint, f"main job ({DEMO_CONFIG.relative_to(ROOT)}, workdir {workdir}): sweep {state['sweep']['result']['name']} trial {state['sweep']['result']['trial_id']}"


def load_student(args, teacher) -> tuple[torch.nn.Module, str]:
    if args.student:
        return ViltAdapter.load(args.student).eval(), str(Path(args.student).resolve())
    if args.sweep_best:
        checkpoint = json.loads(Path(args.sweep_best).read_text())["checkpoint"]
        return ViltAdapter.load(checkpoint).eval(), str(checkpoint)
    if args.quick:
        config = ViltAdapter.student_config(teacher.config, DEFAULT_STUDENT)
        return ViltAdapter.build(config, seed=0).eval(), "random init (quick: default 4-head student; accuracy not meaningful)"
    checkpoint, source = demo_student(Path(args.demo_workdir).resolve())
    return ViltAdapter.load(checkpoint).eval(), source


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


def fp32_session(model, val, workdir: Path, name: str, args) -> tuple[object, dict]:
    """The fp32 graph of ``model`` as ``amad export`` ships it: exported, parity-gated (<= 1e-4 on 256
    validation questions), and the ONNX Runtime-optimised graph instead when it passes the same gate
    and is faster at batch 1. Returns the session and notes (parity, optimiser, file, exported path)."""
    example = val.batch(torch.arange(2))
    exported = onnx_tools.export_onnx(model, workdir / f"{name}.onnx", example, exporter=args.exporter)
    check = [val.batch(torch.arange(min(256, len(val))))]
    expected = onnx_tools.torch_logits(model, check)

    def parity(session) -> float:
        return float(np.abs(onnx_tools.ort_logits(session, check) - expected).max())

    plain = onnx_tools.open_session(exported, threads=args.threads)
    notes = {"parity_fp32": parity(plain), "exported": exported}
    if notes["parity_fp32"] > 1e-4:
        raise SystemExit(f"the exported {name} fails the parity gate: max |logit diff| {notes['parity_fp32']:.3g} > 1e-4")
    chosen, chosen_file = plain, exported
    shape = shape_summary(model.config)
    uniform = len(set(shape["heads_per_layer"])) == 1  # as amad export: 0 = let the optimizer read each layer's heads from the graph
    optimized_file = workdir / f"{name}.opt.onnx"
    notes["optimizer"] = onnx_tools.optimize_graph(exported, optimized_file, heads=shape["heads"] if uniform else 0, hidden=shape["hidden_size"])
    optimized = onnx_tools.open_session(optimized_file, threads=args.threads)
    notes["parity_optimized"] = parity(optimized)
    if notes["parity_optimized"] <= 1e-4:
        one = [val.batch(torch.arange(1))]
        times = interleaved({"plain": ort_runner(plain), "optimized": ort_runner(optimized)}, one, 50)
        if np.median(times["optimized"]) < np.median(times["plain"]):
            chosen, chosen_file = optimized, optimized_file
    notes["fp32_file"] = chosen_file.name
    return chosen, notes


def build_sessions(teacher, student, val, workdir: Path, args) -> tuple[dict, dict]:
    """ONNX Runtime sessions: teacher fp32, student fp32 and int8; and their notes."""
    teacher_session, teacher_notes = fp32_session(teacher, val, workdir, "teacher", args)
    student_session, notes = fp32_session(student, val, workdir, "student", args)
    int8 = onnx_tools.quantize_int8(notes.pop("exported"), workdir / "student.int8.onnx")
    int8_session = onnx_tools.open_session(int8, threads=args.threads)
    check = [val.batch(torch.arange(min(256, len(val))))]
    notes["int8_max_abs_logit_diff"] = float(np.abs(onnx_tools.ort_logits(int8_session, check) - onnx_tools.torch_logits(student, check)).max())
    teacher_notes.pop("exported")
    notes["teacher"] = teacher_notes
    sessions = {"teacher_ort_fp32": teacher_session, "student_ort_fp32": student_session, "student_ort_int8": int8_session}
    return sessions, notes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(DEFAULT_TEACHER))
    parser.add_argument("--student", default=None, help="a student checkpoint directory")
    parser.add_argument("--sweep-best", default=None, help="a sweep's best.json (its checkpoint is the student)")
    parser.add_argument("--demo-workdir", default=str(DEMO_WORKDIR),
                        help="with no --student/--sweep-best: the main job's workdir (its finished stages are reused)")
    parser.add_argument("--exporter", default="dynamo", choices=onnx_tools.EXPORTERS)
    parser.add_argument("--repeats", type=int, default=200, help="batch-1 calls per variant (batch 32: a quarter)")
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT threads, the same for every variant")
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
    threads = args.threads
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        teacher_dir = quick_teacher(scratch / "teacher") if args.quick else Path(args.teacher)
        teacher = ViltAdapter.load(teacher_dir).eval()
        spec = BenchmarkSpec.from_dict(json.loads((teacher_dir / names.BENCHMARK_FILE).read_text()))
        val = make_split(spec, "val", load_tokenizer(teacher_dir))
        if args.quick:
            val = val.subset(torch.arange(min(256, len(val))))
        student, student_source = load_student(args, teacher)
        sessions, notes = build_sessions(teacher, student, val, scratch, args)
        runners = {
            "teacher_torch": torch_runner(teacher),
            "teacher_ort_fp32": ort_runner(sessions["teacher_ort_fp32"]),
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
        "student_vs_teacher_ort_b1": p50["student_ort_fp32"] / p50["teacher_ort_fp32"],
        "ort_fp32_vs_torch_student_b1": p50["student_torch"] / p50["student_ort_fp32"],
        "ort_fp32_vs_teacher_torch_b1": p50["teacher_torch"] / p50["student_ort_fp32"],
        "accuracy_gap_teacher_minus_student_ort_fp32": acc["teacher_ort_fp32"] - acc["student_ort_fp32"],
    }
    results = {
        "command": " ".join(["python", "benchmarks/inference.py", *(argv if argv is not None else sys.argv[1:])]),
        "p50_ms": p50,
        "p99_ms": p99,
        "rps_b32": rps,
        "accuracy": acc,
        "ratios": ratios,
        "meets_targets": {
            "student_vs_teacher_ort_b1": ratios["student_vs_teacher_ort_b1"] <= 0.6 and ratios["accuracy_gap_teacher_minus_student_ort_fp32"] <= 0.05,
            "ort_fp32_vs_torch_student_b1": ratios["ort_fp32_vs_torch_student_b1"] >= 2.0,
        },
        "targets": TARGETS,
        "notes": notes,
        "config": {
            "teacher": "random tiny (quick)" if args.quick else str(Path(args.teacher).resolve()),
            "student": student_source,
            "student_shape": shape_summary(student.config),
            "teacher_shape": shape_summary(teacher.config),
            "student_parameters": sum(p.numel() for p in student.parameters()),
            "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
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
    print(f"student ORT fp32 vs teacher ORT fp32, batch 1: {ratios['student_vs_teacher_ort_b1']:.2f}x the teacher's p50 (target <= 0.6x), "
          f"accuracy gap {ratios['accuracy_gap_teacher_minus_student_ort_fp32'] * 100:.1f} points (target <= 5)")
    print(f"student ORT fp32 vs student PyTorch, batch 1: {ratios['ort_fp32_vs_torch_student_b1']:.2f}x faster (target >= 2x)")
    print(f"student: {student_source}; fp32 graphs: student {notes['fp32_file']} ({notes['optimizer']}), teacher {notes['teacher']['fp32_file']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
