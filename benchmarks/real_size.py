"""A ViLT-B/32-sized teacher through the whole bring-your-own path on this machine.

Run from the repository root (about 15 minutes on 2 cores; ``--quick`` shrinks the model for a smoke run):

    .venv/bin/python benchmarks/real_size.py
    .venv/bin/python benchmarks/real_size.py --quick --out /tmp/real_size.json

**Teacher.** ``ViltConfig()`` defaults (12 layers x 12 heads, hidden 768, FFN 3072, 384 px images in
32 px patches, 40 text tokens) with 3,129 answer labels and a BERT-sized WordPiece vocabulary
(30,522 tokens: the benchmark's words, then filler tokens), random weights built locally and saved
with ``save_pretrained`` + ``ViltProcessor.save_pretrained`` (ViLT's own image processor: shortest
edge 384, aspect kept, ``size_divisor`` 32). Nothing is downloaded; the weights are random, so this
measures time, memory and correctness of the path, not accuracy.

**Data.** The built-in benchmark written as VQA-v2 files (``amad data export-vqa-v2``), every image
resized to a 640x480 landscape or 480x640 portrait photo, so the processor makes 384x512 / 512x384
inputs (12x16 / 16x12 patches) and batches mixing both are padded with a ``pixel_mask``.

**Measured.**
1. ``amad run`` on a YAML written here (one trial: a student pruned to 6 heads x 6 layers with half of
   each FFN, ``student.init: pruned``; a few steps of AMAD + logit KD + ViLT's soft-target BCE), in a
   subprocess: the real pipeline (Ray Tune + Train, export with the parity gate, MLflow registry, a
   Ray Serve answer over HTTP on 127.0.0.1, report). Its stage times, the export gate's parity, the
   served answers and the report's same-runtime ONNX Runtime p50 of teacher and student (batch 1,
   ``--threads`` threads, calls interleaved).
2. In this process: one distillation step (teacher forward without gradients + student forward and
   backward with attention maps + AMAD-KL + AdamW step) at ``--batch-size``, median of
   ``--steps`` after a warm-up step, and the process's peak resident memory; the time of each
   TorchScript ONNX export; parity of both exported graphs against PyTorch on validation batches
   that mix both photo shapes.

Targets (issue 19): export parity max |logit diff| <= 1e-4 with 100 % top-1 agreement; student ORT
p50 <= 0.5 x the teacher's. Writes ``benchmarks/results/real_size.json`` (with the command) and
prints a table. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import statistics
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "real_size.json"
VQA_ANSWERS = 3129
BERT_VOCAB = 30522
PHOTO = (640, 480)  # width x height of a typical COCO photo


def _log(message: str) -> None:
    print(f"[real_size] {message}", flush=True)


def build_teacher(directory: Path, quick: bool) -> dict:
    """A ViLT-B/32-shaped VQA checkpoint with random weights, as save_pretrained writes one."""
    from transformers import ViltConfig

    from amad.data.scenes import ANSWERS, vocabulary
    from amad.data.text import SPECIAL_TOKENS
    from amad.hf_checkpoint import wordpiece_from_vocab, write_vilt_checkpoint

    words = [*SPECIAL_TOKENS, "[MASK]", *sorted(set(vocabulary()) - set(SPECIAL_TOKENS))]
    size = 2000 if quick else BERT_VOCAB
    words += [f"filler{i}" for i in range(size - len(words))]  # a BERT-sized embedding table
    labels = list(ANSWERS) + [f"answer {i}" for i in range(VQA_ANSWERS - len(ANSWERS))]
    shape = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=12, intermediate_size=768) if quick else {}
    config = ViltConfig(**shape, id2label=dict(enumerate(labels)), label2id={a: i for i, a in enumerate(labels)})
    write_vilt_checkpoint(directory, config, wordpiece_from_vocab({w: i for i, w in enumerate(words)}))
    return {"layers": config.num_hidden_layers, "heads": config.num_attention_heads, "hidden": config.hidden_size,
            "intermediate": config.intermediate_size, "image_size": config.image_size, "patch_size": config.patch_size,
            "max_text_tokens": config.max_position_embeddings, "answers": len(labels), "vocabulary": len(words)}


def write_photos(data: Path, scenes: dict[str, int]) -> dict:
    """The benchmark as VQA-v2 files, each image resized to a landscape or portrait photo."""
    from amad.data.benchmark import BenchmarkSpec
    from amad.data.vqa_v2 import write_vqa_v2

    spec = BenchmarkSpec(train_scenes=scenes["train"], val_scenes=scenes["val"], test_scenes=scenes["test"])
    written = write_vqa_v2(spec, data, splits=("train", "val", "test"))
    for split in written:
        for number, path in enumerate(sorted(Path(written[split]["images"]).iterdir())):
            size = PHOTO if number % 2 else PHOTO[::-1]
            with Image.open(path) as image:
                image.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(path, quality=90)
    return {split: {key: str(files[key]) for key in ("questions", "annotations", "images")} for split, files in written.items()}


def write_yamls(root: Path, teacher: Path, data: dict, args) -> Path:
    sweep = {
        "name": "real-size",
        "job": {
            "teacher": str(teacher),
            "data": {"source": "vqa_v2", "train": {**data["train"], "max_questions": args.train_questions},
                     "val": {**data["val"], "max_questions": args.val_questions}, "test": data["test"]},
            "student": {"heads": args.student_heads, "layers": args.student_layers, "init": "pruned", "ffn_keep": 0.5,
                        "importance_examples": args.importance_examples},
            "objective": {"method": "amad", "amad_variant": "kl", "amad_temperature": 1.0, "layer_map": "uniform", "task_loss": "vqa_bce"},
            "train": {"epochs": 1, "batch_size": args.batch_size, "lr": 1.0e-4, "warmup_steps": 1},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1, "use_gpu": False, "threads_per_worker": args.threads},
            "checkpoints_to_keep": 1, "max_failures": 0, "eval_batch_size": args.batch_size,
        },
        "space": {"student.heads": {"grid": [args.student_heads]}},
        "search": {"algorithm": "random", "num_samples": 1, "seed": 0},
        "scheduler": {"type": "fifo"},
        "max_concurrent_trials": 1,
        "time_budget_s": 3600,
        "selection": {"max_params": None, "max_latency_ms": None, "latency_batch_size": 2, "latency_repeats": 3},
    }
    export = yaml.safe_load((ROOT / "tune_configs" / "export.yaml").read_text())
    export.update(exporter="torchscript", optimize=False, latency_repeats=10)
    export["gates"]["parity_examples"] = args.val_questions
    run = {
        "name": "real-size", "teacher": {"path": str(teacher)}, "sweep": str(root / "sweep.yaml"), "export": str(root / "export.yaml"),
        "smoke": {"enabled": True, "questions": 4, "port": args.port},
        "report": {"alignment_examples": 8, "latency_repeats": args.repeats, "latency_threads": args.threads, "max_latency_ratio": 0.5},
    }
    for name, values in (("sweep.yaml", sweep), ("export.yaml", export), ("run.yaml", run)):
        (root / name).write_text(yaml.safe_dump(values, sort_keys=False))
    return root / "run.yaml"


def run_pipeline(run_yaml: Path, workdir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--config", str(run_yaml), "--workdir", str(workdir)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - started
    (workdir.parent / "amad-run.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"amad run failed (rc {done.returncode}); log: {workdir.parent / 'amad-run.log'}\n{done.stderr[-3000:]}")
    stage_seconds = {}
    for line in done.stdout.splitlines() + done.stderr.splitlines():
        if line.startswith("[run real-size] ") and ": done in " in line:
            stage, _, rest = line[len("[run real-size] "):].partition(": done in ")
            stage_seconds[stage] = float(rest.split(" s")[0])
    state = json.loads((workdir / "pipeline_state.json").read_text())
    export_report = json.loads(Path(state["export"]["result"]["report"]).read_text())
    comparison = state["report"]["result"]["comparison"]
    return {
        "wall_seconds": wall, "stage_seconds": stage_seconds,
        "checkpoint": state["sweep"]["result"]["checkpoint"], "teacher_onnx": state["export"]["result"]["teacher_onnx"],
        "student_onnx": state["export"]["result"]["onnx"], "model_uri": state["export"]["result"]["model_uri"],
        "parity_gate": export_report["gates"]["parity_fp32"],
        "serve": {k: state["smoke"]["result"][k] for k in ("questions", "agreed", "served", "offline")},
        "comparison": {label: {k: comparison[label][k] for k in ("parameters", "heads", "layers", "p50_ms", "p99_ms", "accuracy", "vqa_accuracy")
                               if k in comparison[label]} for label in ("teacher", "student")}
        | {"test_questions": comparison["test_questions"], "latency_threads": comparison["latency_threads"],
           "latency_repeats": comparison["latency_repeats"], "latency_ratio": comparison["latency_ratio"]},
    }


def measure_in_process(teacher_dir: Path, checkpoint: Path, workdir: Path, args) -> dict:
    """One distillation step's time and peak memory; export time and mixed-shape parity of both graphs."""
    from amad.data.sources import split_for_model
    from amad.models import ViltAdapter
    from amad.objective import DistillationObjective
    from amad.training import make_optimizer
    from pipeline import onnx_tools

    torch.set_num_threads(args.threads)
    teacher = ViltAdapter.load(teacher_dir).eval()
    student = ViltAdapter.load(checkpoint).train()
    train = split_for_model(checkpoint, "train")
    val = split_for_model(checkpoint, "val")
    objective = DistillationObjective(task_loss="vqa_bce", method="amad", amad_variant="kl", amad_temperature=1.0, layer_map="uniform")
    optimizer = make_optimizer(student, 1e-4, 0.01)
    batch = train.batch(torch.arange(args.batch_size))
    step_seconds = []
    for _ in range(args.steps + 1):
        started = time.perf_counter()
        with torch.no_grad():
            t_out = ViltAdapter.forward(teacher, batch, need_attentions=True)
        s_out = ViltAdapter.forward(student, batch, need_attentions=True)
        loss = objective(t_out, s_out, batch["soft_targets"])["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - started)
    peak_rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    student.eval()
    shapes = sorted({tuple(val.batch(torch.tensor([i]))["pixel_values"].shape[2:]) for i in range(min(len(val), 20))})
    rows = torch.arange(min(len(val), 8))
    mixed = val.batch(rows)
    patch = student.config.patch_size
    out = {"batch_size": args.batch_size,
           "tokens_per_example": [int(batch["input_ids"].shape[1] + 1 + (h // patch) * (w // patch)) for h, w in shapes],
           "step_seconds_median": statistics.median(step_seconds[1:]), "step_seconds": step_seconds[1:],
           "peak_rss_gib": peak_rss_gib, "photo_shapes_after_processing": [list(s) for s in shapes],
           "mixed_batch_pixel_values": list(mixed["pixel_values"].shape)}
    for label, model in (("teacher", teacher), ("student", student)):
        started = time.perf_counter()
        path = onnx_tools.export_onnx(model, workdir / f"{label}-inprocess.onnx", val.batch(rows[:2]), exporter="torchscript")
        export_seconds = time.perf_counter() - started
        session = onnx_tools.open_session(path, threads=args.threads)
        with torch.no_grad():
            expected = model(**{k: mixed[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_mask")}).logits.numpy()
        got = session.run([onnx_tools.OUTPUT_NAME], onnx_tools.model_inputs(mixed))[0]
        out[label] = {"export_seconds": export_seconds, "onnx_mb": path.stat().st_size / 2**20,
                      "parity_max_abs_logit_diff": float(np.abs(got - expected).max()),
                      "parity_top1_agreement": float((got.argmax(-1) == expected.argmax(-1)).mean()), "parity_examples": len(rows)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a new temporary one)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="a 4-layer, hidden-192 teacher and fewer questions: a smoke run")
    parser.add_argument("--student-heads", type=int, default=6)
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="in-process distillation steps timed (after one warm-up)")
    parser.add_argument("--train-questions", type=int, default=32)
    parser.add_argument("--val-questions", type=int, default=16)
    parser.add_argument("--importance-examples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30, help="interleaved ORT calls per model in the report")
    parser.add_argument("--port", type=int, default=0, help="the smoke test's Serve port (default 0: any free port)")
    args = parser.parse_args(argv)
    if args.quick:  # the quick teacher has 4 layers
        args.student_layers = min(args.student_layers, 2)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="amad-real-size-"))
    if args.workdir is None:  # a directory of our own: gone when the script ends (give --workdir to keep the files)
        atexit.register(shutil.rmtree, root, True)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    _log(f"writing the teacher checkpoint and VQA-v2 files under {root}")
    t0 = time.perf_counter()
    teacher_shape = build_teacher(root / "teacher", args.quick)
    build_seconds = time.perf_counter() - t0
    data = write_photos(root / "data", {"train": 8, "val": 4, "test": 4})
    run_yaml = write_yamls(root, root / "teacher", data, args)
    _log(f"teacher {teacher_shape} written in {build_seconds:.0f} s; running amad run --config {run_yaml}")
    pipeline_figures = run_pipeline(run_yaml, root / "work")
    _log(f"amad run done in {pipeline_figures['wall_seconds']:.0f} s; measuring a distillation step and the exports in-process")
    in_process = measure_in_process(root / "teacher", Path(pipeline_figures["checkpoint"]), root, args)
    comparison = pipeline_figures["comparison"]
    ratio = comparison["latency_ratio"]
    parity_ok = all(in_process[m]["parity_max_abs_logit_diff"] <= 1e-4 and in_process[m]["parity_top1_agreement"] == 1.0 for m in ("teacher", "student"))
    gate = pipeline_figures["parity_gate"]
    result = {
        "command": "python benchmarks/real_size.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "teacher_shape": teacher_shape,
        "pipeline": pipeline_figures,
        "in_process": in_process,
        "targets": {
            "parity": {"max_abs_logit_diff": 1e-4, "top1_agreement": 1.0,
                       "met": parity_ok and gate["max_abs_logit_diff"] <= 1e-4 and gate["top1_agreement"] == 1.0},
            "latency_ratio": {"max": 0.5, "measured": ratio, "met": ratio <= 0.5},
        },
        "wall_seconds": time.perf_counter() - started,
        "threads": args.threads, "cpu_count": os.cpu_count(), "load_average_after": list(os.getloadavg()),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    rows = [("parameters", f"{comparison['teacher']['parameters']:,}", f"{comparison['student']['parameters']:,}"),
            ("heads x layers", f"{comparison['teacher']['heads']} x {comparison['teacher']['layers']}",
             f"{comparison['student']['heads']} x {comparison['student']['layers']}"),
            (f"ORT p50 batch 1, {args.threads} threads (ms)", f"{comparison['teacher']['p50_ms']:.1f}", f"{comparison['student']['p50_ms']:.1f}"),
            ("TorchScript export (s)", f"{in_process['teacher']['export_seconds']:.1f}", f"{in_process['student']['export_seconds']:.1f}"),
            ("parity max |diff|, mixed shapes", f"{in_process['teacher']['parity_max_abs_logit_diff']:.1e}",
             f"{in_process['student']['parity_max_abs_logit_diff']:.1e}")]
    print(f"{'':36} | {'teacher':>12} | {'student':>12}")
    for name, teacher_value, student_value in rows:
        print(f"{name:36} | {teacher_value:>12} | {student_value:>12}")
    print(f"student / teacher ORT p50: {ratio:.2f} (target <= 0.5: {'met' if ratio <= 0.5 else 'NOT met'}); "
          f"export gate parity {gate['max_abs_logit_diff']:.1e}, top-1 {gate['top1_agreement']:.0%} on {gate['examples']} examples")
    print(f"distillation step, batch {args.batch_size}: median {in_process['step_seconds_median']:.2f} s; peak RSS {in_process['peak_rss_gib']:.1f} GiB")
    serve = pipeline_figures["serve"]
    print(f"Serve: {serve['agreed']}/{serve['questions']} answers over HTTP agree with ONNX Runtime offline; stages (s): {pipeline_figures['stage_seconds']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
