"""The paper's claim on our benchmark: AMAD vs the other distillation objectives, per student head count.

Run from the repository root:

    .venv/bin/python benchmarks/compare_methods.py                 # full: 7 methods x 3 head counts x 3 seeds
    .venv/bin/python benchmarks/compare_methods.py --quick --out /tmp/cm.json --results-md /tmp/results.md

**Set-up.** The default teacher (``weights/teacher-default``: 12 heads x 4 layers, hidden 96) is
distilled into students of 2, 4 and 6 heads (2 layers, head_dim 16: hidden 32/64/96), 3 seeds each,
with every method below. Every run has the same budget: ``--steps`` AdamW steps of batch
``--batch-size`` on the teacher's training split (same seeds, same data order per seed), lr with
warm-up and cosine decay, gradient clipping 1.0, plain PyTorch processes (no Ray: the comparison is
about the objective, and in-process training keeps every run identical apart from it). The students
of one (heads, seed) -- one per method -- train in lockstep: the same initial weights and batches,
and one teacher forward per step shared by all of them (the teacher's forward is most of a step's
cost; nothing else is shared, and with dropout 0 each student gets exactly what a run of its own would). Methods
(:class:`amad.objective.DistillationObjective`; task weight 1 everywhere):

* ``task``: cross-entropy only.            * ``logit_kd``: + logit KD (weight 1, T = 1).
* ``one_to_one``: + logit KD + attention KD of teacher head k -> student head k (extra teacher heads dropped).
* ``head_mean``: + logit KD + KD of the teacher heads' mean map to every student head.
* ``relation``: + logit KD + MiniLMv2 self-attention relations.
* ``amad_t1``: + logit KD + AMAD (KL, alignment temperature 1, the paper's).
* ``amad_tsweep``: + logit KD + AMAD at ``--sweep-temperature`` (the sweep's preferred value: from a
  ``best.json`` via ``--sweep-best``, else 0.3).

Attention terms use weight 1 and ``layer_map="uniform"``. Test accuracy on ``--test-scenes`` scenes
(10 questions each; 1000 scenes = 10,000 questions, so one accuracy's standard error is below 0.5
point). For the AMAD students the script also records how uniform the alignment weights are on
validation data (mean over teacher heads of the largest ``a_ij``; 1/Hs is uniform, 1 is one-hot).

Writes ``benchmarks/results/compare_methods.json`` (``accuracy[method][heads] = [per-seed]``) and the
generated ``docs/results.md`` (never edit it by hand). Every finished run is also appended, one JSON
line each, to ``<out stem>.runs.jsonl`` next to ``--out``, keyed by a hash of the settings its result
depends on (teacher weights, student shape, budget, test size): running the command again reuses the
runs logged under the same key and trains only the rest, so a long comparison survives an interrupt
(``--fresh`` ignores the log). ``--jobs N`` trains N runs at once in separate processes of
``--threads`` threads each (on 2 cores, ``--jobs 2 --threads 1`` keeps both busy). ``--quick``: a random tiny teacher, 2 heads,
1 seed, 20 steps: a smoke run for CI, its accuracies mean nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import amad  # noqa: F401
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:  # sibling helpers: the folder is not a package
    sys.path.insert(0, str(ROOT / "benchmarks"))

import torch
from torch import nn

from amad.data.benchmark import BenchmarkSpec, make_split
from amad.data.text import load_tokenizer
from amad.losses import align_weights
from amad.models import StudentSpec, ViltAdapter
from amad.objective import DistillationObjective, resolve_layer_map
from amad.training import accuracy_report, predict
from pipeline import names
from pipeline.registry import file_sha256
from lockstep import train_lockstep  # noqa: E402

METHODS = ("task", "logit_kd", "one_to_one", "head_mean", "relation", "amad_t1", "amad_tsweep")
DEFAULT_TEACHER = ROOT / "weights" / "teacher-default"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "compare_methods.json"
DEFAULT_MD = ROOT / "docs" / "results.md"


def objective_for(method: str, relation_heads: int, sweep_temperature: float) -> DistillationObjective:
    kd = {"task_weight": 1.0, "logit_kd_weight": 1.0, "attention_weight": 1.0, "layer_map": "uniform"}
    if method == "task":
        return DistillationObjective(method="none", task_weight=1.0, logit_kd_weight=0.0, attention_weight=0.0)
    if method == "logit_kd":
        return DistillationObjective(method="none", task_weight=1.0, logit_kd_weight=1.0, attention_weight=0.0)
    if method == "relation":
        return DistillationObjective(method="relation", relation_heads=relation_heads, **kd)
    if method.startswith("amad"):
        return DistillationObjective(method="amad", amad_temperature=1.0 if method == "amad_t1" else sweep_temperature, **kd)
    return DistillationObjective(method=method, **kd)


def relation_heads_for(*hidden_sizes: int, wanted: int = 4) -> int:
    common = math.gcd(*hidden_sizes)
    return max(a for a in range(1, min(wanted, common) + 1) if common % a == 0)


def train_students(teacher, spec: StudentSpec, objectives: dict[str, DistillationObjective], train, args, seed: int) -> dict[str, nn.Module]:
    """One student per objective, trained in lockstep (:func:`lockstep.train_lockstep`): same initial
    weights (``seed``), same batches in the same order, one teacher forward per step shared by all.

    Sharing the teacher's forward (the dominant cost: ~100 ms of a ~190 ms AMAD step at batch 64) is
    what makes 63 runs affordable on 2 cores.
    """
    students = {m: ViltAdapter.build(ViltAdapter.student_config(teacher.config, spec), seed=seed) for m in objectives}
    return train_lockstep(teacher, students, objectives, train, steps=args.steps, batch_size=args.batch_size,
                          lr=args.lr, warmup=args.warmup, seed=seed)


def alignment_peak(teacher, student, split, temperature: float, examples: int = 256) -> float:
    """Mean over teacher heads, layers and questions of max_j a_ij (1/Hs: uniform; 1: one-hot)."""
    batch = split.batch(torch.arange(min(examples, len(split))))
    with torch.no_grad():
        t_out = ViltAdapter.forward(teacher, batch)
        s_out = ViltAdapter.forward(student, batch)
    pairs = resolve_layer_map("uniform", teacher.config.num_hidden_layers, student.config.num_hidden_layers)
    peaks = [align_weights(t_out.attentions["self"][t], s_out.attentions["self"][s], t_out.query_masks["self"],
                           temperature=temperature).max(-1).values.mean().item() for s, t in pairs]
    return float(statistics.mean(peaks))


def quick_teacher(directory: Path) -> Path:
    """A random teacher in the tiny preset's shape (``--quick``), saved like `amad teacher` saves one."""
    from pipeline import train_teacher
    from pipeline.config import TeacherJobConfig, load_config

    return train_teacher.save_untrained(load_config(ROOT / "tune_configs" / "tiny" / "teacher.yaml", TeacherJobConfig), directory)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(DEFAULT_TEACHER))
    parser.add_argument("--heads", type=int, nargs="+", default=None, help="student head counts (default 2 4 6; --quick: 2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps per run (the budget)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--test-scenes", type=int, default=1000, help="x10 questions")
    parser.add_argument("--sweep-best", default=None, help="a sweep's best.json: its objective.amad_temperature is amad_tsweep's")
    parser.add_argument("--sweep-temperature", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once, one process each (--threads per process)")
    parser.add_argument("--fresh", action="store_true", help="ignore finished runs logged next to --out (default: reuse them)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--results-md", default=str(DEFAULT_MD))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.warmup, args.test_scenes = 20, 16, 2, 20
    args.heads = args.heads or ([2] if args.quick else [2, 4, 6])
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    if args.sweep_best:
        best = json.loads(Path(args.sweep_best).read_text())["best"]
        args.sweep_temperature = float(best["config"]["objective"]["amad_temperature"])
    return args


CLAIM_BASELINES = ("one_to_one", "logit_kd")


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of ``a - b`` over seeds, in points. Paired: the students of one seed
    start from the same weights and see the same batches, so seed-to-seed variation cancels."""
    diffs = [100 * (x - y) for x, y in zip(a, b)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return statistics.mean(diffs), se


def claim_lines(results: dict) -> list[str]:
    """The paper's claim -- AMAD beats one-to-one and logit KD when the student has fewer heads --
    checked per head count: paired difference ± its standard error; a verdict only beyond 2 of them."""
    accuracy, heads = results["accuracy"], results["config"]["heads"]
    pairs = [(a, b) for a in accuracy if a.startswith("amad") for b in CLAIM_BASELINES if b in accuracy]
    if not pairs:
        return []
    lines = ["", "The paper's claim, per head count: AMAD minus the baseline, test accuracy points, mean ± standard error "
                 "of the per-seed (paired) difference; a verdict only where the difference exceeds 2 standard errors:", "",
             "| comparison | " + " | ".join(f"{h} heads" for h in heads) + " |", "| --- | " + " | ".join("---" for _ in heads) + " |"]
    for a, b in pairs:
        cells = []
        for h in heads:
            mean, se = paired_difference(accuracy[a][str(h)], accuracy[b][str(h)])
            if math.isnan(se):
                cells.append(f"{mean:+.2f} (1 seed: no error bar)")
                continue
            verdict = "better" if mean > 2 * se else "worse" if mean < -2 * se else "no clear difference"
            cells.append(f"{mean:+.2f} ± {se:.2f} ({verdict})")
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return lines


def write_markdown(path: Path, results: dict, command: str) -> None:
    heads = results["config"]["heads"]
    lines = [
        "<!-- generated by benchmarks/compare_methods.py: do not edit by hand -->",
        "# Distillation methods on the built-in benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Teacher: {results['config']['teacher']} ({results['teacher']['heads']} heads x {results['teacher']['layers']} layers), "
        f"test accuracy **{results['teacher']['accuracy']:.2%}** on the same {results['config']['test_questions']} test questions.",
        f"Students: {results['config']['layers']} layers, head_dim {results['config']['head_dim']}; {results['config']['steps']} steps of batch "
        f"{results['config']['batch_size']} per run; {len(results['config']['seeds'])} seeds. Test accuracy, mean ± std over seeds:",
        "",
        "| method | " + " | ".join(f"{h} heads" for h in heads) + " |",
        "| --- | " + " | ".join("---" for _ in heads) + " |",
    ]
    for method, per_heads in results["accuracy"].items():
        cells = []
        for h in heads:
            values = per_heads[str(h)]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2%} ± {std:.2%}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if results.get("alignment_peak"):
        lines += ["", "AMAD alignment peak (mean over teacher heads of max_j a_ij on validation data; uniform = 1/heads):", ""]
        for method, per_heads in results["alignment_peak"].items():
            lines.append(f"- {method}: " + ", ".join(f"{h} heads {statistics.mean(v):.3f} (uniform {1 / int(h):.3f})" for h, v in per_heads.items()))
    lines += claim_lines(results)
    config = results["config"]
    groups = len(heads) * len(config["seeds"])
    lines += ["", f"Time: the {groups} lockstep groups ({len(config['methods'])} students each) trained for {results['train_seconds'] / 60:.1f} min in all "
                  f"({config['threads']} thread(s) per group, {config['jobs']} group(s) at a time, {config['cpu_count']} CPUs, {config['machine']}); "
                  f"the command that wrote this page ran {results['seconds'] / 60:.1f} min and reused {results['reused_runs']} finished runs from its run log."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def run_key(args, teacher_dir: Path) -> str:
    """What a finished run's accuracy depends on: a logged run with another key is not reused."""
    teacher = "random tiny (quick)" if args.quick else file_sha256(teacher_dir / "model.safetensors")
    settings = {"teacher": teacher, "layers": args.layers, "head_dim": args.head_dim, "steps": args.steps,
                "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup, "test_scenes": args.test_scenes,
                "sweep_temperature": args.sweep_temperature}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def read_run_log(path: Path, key: str) -> dict[tuple[str, int, int], dict]:
    """Finished runs recorded under ``key``; a line cut short by a kill is skipped, other keys are kept in the file."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("key") == key:
                done[(record["method"], record["heads"], record["seed"])] = record
    return done


def train_seconds(records) -> float:
    """The lockstep groups' wall times, each group counted once: the work done, whatever ``--jobs`` was."""
    return sum(seconds for _, _, seconds in {(r["heads"], r["seed"], r["group_seconds"]) for r in records})


_WORKER: dict = {}


def _load_world(teacher_dir: Path, args) -> dict:
    teacher = ViltAdapter.load(teacher_dir).eval()
    spec = BenchmarkSpec.from_dict(json.loads((teacher_dir / names.BENCHMARK_FILE).read_text()))
    tokenizer = load_tokenizer(teacher_dir)
    return {
        "args": args, "teacher": teacher,
        "train": make_split(spec, "train", tokenizer),
        "val": make_split(replace(spec, val_scenes=min(spec.val_scenes, 100)), "val", tokenizer),
        "test": make_split(replace(spec, test_scenes=args.test_scenes), "test", tokenizer),
    }


def _init_worker(teacher_dir: str, args) -> None:
    torch.set_num_threads(max(1, args.threads or 1))
    _WORKER.update(_load_world(Path(teacher_dir), args))


def run_group(task: tuple[int, int, tuple[str, ...]], world: dict | None = None) -> list[dict]:
    """Train and test the students of ``methods`` for one (heads, seed) in lockstep; one record per method.
    In a ``--jobs`` worker the world (teacher, splits) is the worker's own."""
    world = world or _WORKER
    args, teacher = world["args"], world["teacher"]
    heads, seed, methods = task
    clock = time.perf_counter()
    relation_heads = relation_heads_for(teacher.config.hidden_size, heads * args.head_dim)
    objectives = {m: objective_for(m, relation_heads, args.sweep_temperature) for m in methods}
    students = train_students(teacher, StudentSpec(heads, args.layers, args.head_dim), objectives, world["train"], args, seed)
    records = []
    for method, student in students.items():
        record = {"method": method, "heads": heads, "seed": seed,
                  "accuracy": accuracy_report(predict(student, ViltAdapter, world["test"])[0], world["test"])["accuracy"]}
        if method.startswith("amad"):
            record["alignment_peak"] = alignment_peak(teacher, student, world["val"], objectives[method].amad_temperature)
        records.append(record)
    seconds = round(time.perf_counter() - clock, 1)
    for record in records:
        record.update(group_seconds=seconds, group_methods=len(methods))
    return records


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = Path(args.out)
    log_path = out.with_name(out.stem + ".runs.jsonl")
    with tempfile.TemporaryDirectory() as scratch:
        teacher_dir = quick_teacher(Path(scratch)) if args.quick else Path(args.teacher)
        key = run_key(args, teacher_dir)
        done = {} if args.fresh else read_run_log(log_path, key)
        world = _load_world(teacher_dir, args)
        test = world["test"]
        teacher_accuracy = accuracy_report(predict(world["teacher"], ViltAdapter, test)[0], test)["accuracy"]
        tasks = [(m, h, s) for s in args.seeds for h in args.heads for m in args.methods]
        # One group per (heads, seed), trained in lockstep; seed-major, so an interrupt leaves whole seeds of the table.
        groups = [(h, s, tuple(m for m in args.methods if (m, h, s) not in done)) for s in args.seeds for h in args.heads]
        groups = [group for group in groups if group[2]]
        todo = sum(len(group[2]) for group in groups)
        print(f"{len(tasks)} runs: {len(tasks) - todo} reused from {log_path}, {todo} to train in {len(groups)} lockstep group(s) "
              f"on {args.jobs} process(es)", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)

        def finished(record: dict) -> None:
            record["key"] = key
            done[(record["method"], record["heads"], record["seed"])] = record
            with log_path.open("a") as log:  # one line per run, flushed: a kill loses at most the run in flight
                log.write(json.dumps(record) + "\n")
            print(f"{record['method']:12} heads {record['heads']} seed {record['seed']}: test accuracy {record['accuracy']:.2%} "
                  f"(group of {record['group_methods']}: {record['group_seconds']:.0f} s) [{len(done)}/{len(tasks)}]", flush=True)

        if args.jobs == 1 or len(groups) <= 1:
            for group in groups:
                for record in run_group(group, world):
                    finished(record)
        else:
            context = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state
            with context.Pool(min(args.jobs, len(groups)), initializer=_init_worker, initargs=(str(teacher_dir), args)) as pool:
                for records in pool.imap_unordered(run_group, groups):
                    for record in records:
                        finished(record)
    accuracy = {m: {str(h): [done[(m, h, s)]["accuracy"] for s in args.seeds] for h in args.heads} for m in args.methods}
    peaks = {m: {str(h): [done[(m, h, s)]["alignment_peak"] for s in args.seeds] for h in args.heads}
             for m in args.methods if m.startswith("amad")}
    results = {
        "accuracy": accuracy,
        "alignment_peak": peaks,
        "teacher": {"accuracy": teacher_accuracy, "heads": world["teacher"].config.num_attention_heads,
                    "layers": world["teacher"].config.num_hidden_layers},
        "seconds": time.perf_counter() - started,
        "reused_runs": len(tasks) - todo,
        "train_seconds": train_seconds(done[task] for task in tasks),
        "config": {
            "teacher": "random tiny (quick)" if args.quick else _shown(Path(args.teacher)),
            "heads": args.heads, "seeds": args.seeds, "methods": args.methods, "layers": args.layers, "head_dim": args.head_dim,
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "sweep_temperature": args.sweep_temperature,
            "test_questions": len(test), "quick": args.quick, "threads": torch.get_num_threads(), "jobs": args.jobs, "cpu_count": os.cpu_count(),
            "run_key": key, "torch": torch.__version__, "machine": platform.machine(),
        },
    }
    out.write_text(json.dumps(results, indent=2) + "\n")
    command = "python benchmarks/compare_methods.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_markdown(Path(args.results_md), results, command.strip())
    print(f"wrote {out} and {args.results_md}")
    return results


def _shown(path: Path) -> str:
    """A path as the docs show it: relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


if __name__ == "__main__":
    main()
