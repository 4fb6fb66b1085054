"""Pruned students: accuracy before and after the same distillation budget, and ONNX Runtime speed-up.

Run from the repository root (the full grid is hours on 2 cores; ``--quick`` is a smoke run):

    .venv/bin/python benchmarks/pruning_frontier.py
    .venv/bin/python benchmarks/pruning_frontier.py --heads 4 12 --layers 2 3 --ffn-keep 1.0 --starts pruned --steps 800
    .venv/bin/python benchmarks/pruning_frontier.py --quick --out /tmp/frontier.json

**Students.** Every shape ``heads x layers x ffn_keep`` of the teacher (``--teacher``, default
``weights/teacher-default``) from up to three starts:

* ``pruned``: the teacher's most important heads per layer (Michel et al. 2019), its layers by the
  uniform layer map and its most active FFN neurons (:mod:`amad.pruning`; importance on
  ``--importance-examples`` training questions);
* ``random``: the same pruned architecture with random weights;
* ``regrouped``: today's ``student.init: teacher`` (the teacher's width, its weights regrouped into
  ``heads`` wider heads, layers by the uniform map); only for ``ffn_keep`` 1, the only FFN it can copy.

**Budget.** All students train in lockstep on the same batches (one teacher forward per step,
shared; ``benchmarks/lockstep.py``): ``--steps`` AdamW steps of ``--batch-size`` with warm-up and
cosine decay, CE + logit KD + AMAD (KL, ``--amad-temperature``, uniform layer map), learning rate
``--lr`` (``--lr-random`` for random starts, which need a larger one).

**Measured.** Validation accuracy (the first ``--val-questions`` questions) before and after
training, parameters, and ONNX Runtime batch-1 p50 of each student's exported graph relative to the
**teacher's exported graph** in the same loop (TorchScript exporter, ``--threads`` threads, all
graphs interleaved round-robin over ``--repeats`` calls). Writes
``benchmarks/results/pruning_frontier.json`` (with the exact command) and a PNG of accuracy against
speed-up beside it, and prints a table. Nothing asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import amad  # noqa: F401
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:  # sibling helpers: the folder is not a package
    sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from amad.data.benchmark import BenchmarkSpec, make_split  # noqa: E402
from amad.data.text import load_tokenizer  # noqa: E402
from amad.models import StudentSpec, ViltAdapter  # noqa: E402
from amad.objective import DistillationObjective  # noqa: E402
from amad.pruning import Importance, parameter_count, plan, prune_from_plan, score  # noqa: E402
from amad.training import evaluate  # noqa: E402
from inference import interleaved, ort_runner, quick_teacher  # noqa: E402
from lockstep import train_lockstep  # noqa: E402
from pipeline import names, onnx_tools  # noqa: E402
from run_facts import run_facts  # noqa: E402

STARTS = ("pruned", "random", "regrouped")
DEFAULT_TEACHER = ROOT / "weights" / "teacher-default"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "pruning_frontier.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(DEFAULT_TEACHER))
    parser.add_argument("--heads", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--ffn-keep", type=float, nargs="+", default=[0.5, 1.0])
    parser.add_argument("--starts", nargs="+", default=list(STARTS), choices=STARTS)
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps per student (the budget)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4, help="pruned and regrouped starts")
    parser.add_argument("--lr-random", type=float, default=2e-3, help="random starts")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--amad-temperature", type=float, default=1.0)
    parser.add_argument("--importance-examples", type=int, default=2048)
    parser.add_argument("--val-questions", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=250, help="batch-1 ORT calls per graph")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for training (default: all cores); ORT timing uses 1")
    parser.add_argument("--quick", action="store_true", help="a tiny random teacher, a few steps: checks the script, measures nothing")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    if args.quick:
        args.heads, args.layers, args.ffn_keep = [2], [1, 2], [0.5, 1.0]
        args.steps, args.batch_size, args.warmup, args.repeats = 6, 16, 2, 10
        args.val_questions, args.importance_examples = 64, 64
    return args


def initial_students(teacher, importance: Importance, args) -> dict[str, torch.nn.Module]:
    """Every (start, shape) student before training, keyed ``start/HhxLl/ffnF``."""
    students = {}
    for layers in args.layers:
        for heads in args.heads:
            for ffn_keep in args.ffn_keep:
                shape = f"{heads}hx{layers}l/ffn{ffn_keep:g}"
                pruned = prune_from_plan(teacher, plan(importance, heads, layers, ffn_keep))
                if "pruned" in args.starts:
                    students[f"pruned/{shape}"] = pruned
                if "random" in args.starts:
                    students[f"random/{shape}"] = ViltAdapter.build(pruned.config, seed=0)
                if "regrouped" in args.starts and ffn_keep == 1.0 and teacher.config.hidden_size % heads == 0:
                    config = ViltAdapter.student_config(teacher.config, StudentSpec(heads, layers, teacher.config.hidden_size // heads))
                    regrouped = ViltAdapter.build(config, seed=0)
                    ViltAdapter.init_from_teacher(regrouped, teacher)
                    students[f"regrouped/{shape}"] = regrouped
    return students


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()
    load_before = os.getloadavg()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        teacher_dir = quick_teacher(scratch / "teacher") if args.quick else Path(args.teacher)
        teacher = ViltAdapter.load(teacher_dir).eval().requires_grad_(False)
        spec = BenchmarkSpec.from_dict(json.loads((teacher_dir / names.BENCHMARK_FILE).read_text()))
        tokenizer = load_tokenizer(teacher_dir)
        train, val = make_split(spec, "train", tokenizer), make_split(spec, "val", tokenizer)
        val = val.subset(torch.arange(min(args.val_questions, len(val))))
        importance = score(teacher, train.subset(torch.arange(min(args.importance_examples, len(train)))).batches(128))
        students = initial_students(teacher, importance, args)
        before = {name: evaluate(student.eval(), ViltAdapter, val)["accuracy"] for name, student in students.items()}
        teacher_accuracy = evaluate(teacher, ViltAdapter, val)["accuracy"]
        print(f"{len(students)} students, {args.steps} steps each; teacher {teacher_accuracy:.2%} on {len(val)} validation questions", flush=True)

        objective = DistillationObjective(method="amad", amad_temperature=args.amad_temperature, layer_map="uniform")
        tick = time.perf_counter()
        for group, lr in (("random", args.lr_random), (None, args.lr)):  # random starts take their own learning rate
            chosen = {n: s for n, s in students.items() if (n.startswith("random/") if group else not n.startswith("random/"))}
            if chosen:
                train_lockstep(teacher, chosen, {n: objective for n in chosen}, train, steps=args.steps,
                               batch_size=args.batch_size, lr=lr, warmup=args.warmup, seed=0)
        train_seconds = time.perf_counter() - tick
        after = {name: evaluate(student.eval(), ViltAdapter, val)["accuracy"] for name, student in students.items()}

        torch.set_num_threads(args.threads or torch.get_num_threads())
        example = val.batch(torch.arange(2))
        runners = {"teacher": ort_runner(onnx_tools.open_session(
            onnx_tools.export_onnx(teacher, scratch / "teacher.onnx", example, exporter="torchscript"), threads=1))}
        for index, (name, student) in enumerate(students.items()):
            path = onnx_tools.export_onnx(student, scratch / f"student{index}.onnx", example, exporter="torchscript")
            runners[name] = ort_runner(onnx_tools.open_session(path, threads=1))
        singles = [val.batch(torch.tensor([i])) for i in range(min(64, len(val)))]
        samples = interleaved(runners, singles, args.repeats)
    p50 = {name: float(np.percentile(times, 50)) for name, times in samples.items()}

    rows = []
    for name, student in students.items():
        start, shape, ffn = name.split("/")
        heads, layers = (int(part[:-1]) for part in shape.split("x"))
        rows.append({
            "student": name, "start": start, "heads": heads, "layers": layers, "ffn_keep": float(ffn[3:]),
            "parameters": parameter_count(student), "accuracy_before": before[name], "accuracy_after": after[name],
            "p50_ms": p50[name], "latency_vs_teacher": p50[name] / p50["teacher"],
        })
    results = {
        "command": " ".join(["python", "benchmarks/pruning_frontier.py", *(argv if argv is not None else sys.argv[1:])]),
        "teacher": {"path": "random tiny (quick)" if args.quick else str(teacher_dir), "accuracy": teacher_accuracy,
                    "p50_ms": p50["teacher"], "parameters": parameter_count(teacher)},
        "rows": rows,
        "config": {key: value for key, value in vars(args).items() if key != "out"} | {
            "train_seconds": train_seconds, "validation_questions": len(val), "ort_threads": 1, "exporter": "torchscript",
            "wall_seconds": time.time() - started, **run_facts(load_before, os.getloadavg()),
        },
    }
    print(f"{'student':28} | {'params':>8} | {'before':>7} | {'after':>7} | {'p50 ms':>7} | vs teacher")
    print(f"{'teacher':28} | {parameter_count(teacher):8,} | {teacher_accuracy:7.2%} | {teacher_accuracy:7.2%} | {p50['teacher']:7.3f} | 1.00")
    for row in sorted(rows, key=lambda r: (r["latency_vs_teacher"], r["student"])):
        print(f"{row['student']:28} | {row['parameters']:8,} | {row['accuracy_before']:7.2%} | {row['accuracy_after']:7.2%} | "
              f"{row['p50_ms']:7.3f} | {row['latency_vs_teacher']:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return results


def plot(results: dict, path: Path) -> Path:
    """Accuracy after distillation against speed-up over the teacher (ORT, batch 1), one marker per start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for start, marker in zip(STARTS, "osD"):
        rows = [r for r in results["rows"] if r["start"] == start]
        if rows:
            axis.scatter([1 / r["latency_vs_teacher"] for r in rows], [100 * r["accuracy_after"] for r in rows], marker=marker, label=start)
            for r in rows:
                axis.annotate(f"{r['heads']}h{r['layers']}L f{r['ffn_keep']:g}", (1 / r["latency_vs_teacher"], 100 * r["accuracy_after"]),
                              fontsize=6, xytext=(3, 2), textcoords="offset points")
    teacher = 100 * results["teacher"]["accuracy"]
    axis.axhline(teacher, color="grey", linestyle="--", linewidth=1, label=f"teacher {teacher:.1f} %")
    axis.axhline(teacher - 5, color="grey", linestyle=":", linewidth=1, label="teacher - 5 points")
    axis.axvline(1 / 0.6, color="tab:red", linestyle=":", linewidth=1, label="0.6x the teacher's p50")
    axis.set_xlabel("speed-up over the teacher (ONNX Runtime, batch 1, 1 thread)")
    axis.set_ylabel("validation accuracy after distillation (%)")
    axis.set_title(f"{results['config']['steps']} steps of {results['config']['batch_size']}", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


if __name__ == "__main__":
    main()
