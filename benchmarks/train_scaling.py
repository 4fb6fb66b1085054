"""Data-parallel scaling of ``amad distill``: training samples/s with 1 and with 2 Ray Train workers.

Run from the repository root (a few minutes on an idle 2-core machine; ``--quick`` is a ~1-2 minute
smoke run of the tiny shapes):

    .venv/bin/python benchmarks/train_scaling.py
    .venv/bin/python benchmarks/train_scaling.py --quick --out /tmp/train_scaling.json

**Set-up.** A two-node local ``ray.cluster_utils.Cluster`` (1 CPU and an 80 MB object store per node),
bound to 127.0.0.1 with the loopback environment of :mod:`pipeline.local_cluster` (the one the tests
use), under a private temporary directory; shut down at the end. Each worker count is one real
``train_distill.main`` run -- TorchTrainer, DDP over gloo, per-epoch validation, checkpoint and MLflow
(a throw-away SQLite store) -- with ``cpus_per_worker: 1`` (so 2 workers sit one per node and DDP
crosses nodes), ``threads_per_worker: 1``, ``use_gpu: false`` and the same per-worker batch. Each
worker takes the same number of steps per epoch whatever the worker count (``train_scenes`` is scaled
with it), so both runs measure the same amount of work per worker. The teacher is randomly initialised
in the shape of ``--teacher-config`` (default ``tune_configs/teacher.yaml``; speed does not depend on
its weights) and the student and objective are ``--distill-config``'s (default
``tune_configs/distill.yaml``); ``--quick`` uses the ``tune_configs/tiny/`` pair and fewer steps.

**Measurement (start-up excluded).** Every epoch, the training loop reports ``samples_per_s`` =
steps x per-worker batch x workers / ``epoch_seconds``, where ``epoch_seconds`` runs from a barrier
that starts all workers together to the slowest worker's last optimizer step (an all-reduced max), so
it is the same on every worker and holds neither Ray/worker-group start-up, data generation, model
loading, validation nor checkpointing. Per worker count, ``samples_per_s`` here is the aggregate over
the measured epochs -- total samples / total ``epoch_seconds`` of epochs 2..E, taken from the run's
per-epoch history; epoch 1 is warm-up (first-call allocations, gloo's first collectives) and dropped.
``speedup_2_vs_1`` = ``samples_per_s["2"] / samples_per_s["1"]``. The target (>= 1.6) is reported,
not enforced; the load average before and after is recorded, since the machine may be shared.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import pipeline  # noqa: F401
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

from pipeline.local_cluster import apply_loopback_env, local_cluster  # noqa: E402

if str(ROOT / "benchmarks") not in sys.path:  # sibling helpers: the folder is not a package
    sys.path.insert(0, str(ROOT / "benchmarks"))
from run_facts import run_facts  # noqa: E402

apply_loopback_env()  # before anything imports Ray

import yaml  # noqa: E402

WORKER_COUNTS = (1, 2)
TARGET_SPEEDUP = 1.6
TARGET = f"speedup_2_vs_1 >= {TARGET_SPEEDUP}"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "train_scaling.json"
CONFIGS = {  # (teacher YAML, distill YAML): normal, --quick
    False: (ROOT / "tune_configs" / "teacher.yaml", ROOT / "tune_configs" / "distill.yaml"),
    True: (ROOT / "tune_configs" / "tiny" / "teacher.yaml", ROOT / "tune_configs" / "tiny" / "distill.yaml"),
}
# (normal, --quick) defaults for flags left unset.
DEFAULTS = {"steps": (40, 6), "epochs": (4, 2), "batch_size": (32, 32), "val_scenes": (20, 5)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few steps: a smoke run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    parser.add_argument("--teacher-config", type=Path, default=None, help="teacher YAML whose shape the random teacher takes")
    parser.add_argument("--distill-config", type=Path, default=None, help="distill YAML: student, objective, optimizer")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per worker per epoch")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run; the first is warm-up (>= 2)")
    parser.add_argument("--batch-size", type=int, default=None, help="per-worker batch")
    parser.add_argument("--val-scenes", type=int, default=None, help="validation scenes (not timed)")
    args = parser.parse_args(argv)
    for name, values in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, values[args.quick])
    teacher_config, distill_config = CONFIGS[args.quick]
    args.teacher_config = args.teacher_config or teacher_config
    args.distill_config = args.distill_config or distill_config
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the first epoch is warm-up and not measured")
    return args


def save_random_teacher(teacher_config: Path, directory: Path) -> dict:
    """A randomly initialised teacher of ``teacher_config``'s shape, saved as ``amad teacher`` saves one."""
    from amad.data.benchmark import benchmark_tokenizer
    from amad.data.scenes import ANSWERS
    from amad.data.text import save_tokenizer
    from pipeline import train_teacher
    from pipeline.config import TeacherJobConfig, load_config

    cfg = load_config(teacher_config, TeacherJobConfig)
    tokenizer = benchmark_tokenizer()
    model = train_teacher.build_model(cfg, tuple(ANSWERS), tokenizer.get_vocab_size(), seed=0)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    (directory / train_teacher.BENCHMARK_FILE).write_text(json.dumps(cfg.data.benchmark_spec().to_dict(), indent=2))
    return {
        "config": str(teacher_config.relative_to(ROOT) if teacher_config.is_relative_to(ROOT) else teacher_config),
        "hidden_size": cfg.model.hidden_size, "heads": cfg.model.heads, "layers": cfg.model.layers,
        "image_size": cfg.data.scene.image_size, "patch_size": cfg.model.patch_size,
        "questions_per_scene": cfg.data.questions_per_scene,
    }


def job_config(args, teacher_dir: Path, questions_per_scene: int, workers: int):
    """The distill YAML with the benchmark's teacher, data size, epochs and scaling."""
    from pipeline.config import DistillJobConfig, parse_config

    values = copy.deepcopy(yaml.safe_load(args.distill_config.read_text()))
    values["teacher"] = str(teacher_dir)
    values["data"] = {
        "train_scenes": math.ceil(args.steps * args.batch_size * workers / questions_per_scene),
        "val_scenes": args.val_scenes,
    }
    values["train"].update(epochs=args.epochs, batch_size=args.batch_size)
    values["scaling"] = {"num_workers": workers, "cpus_per_worker": 1, "use_gpu": False, "threads_per_worker": 1, "precision": "fp32"}
    values.update(run_name=f"scaling-{workers}w", checkpoints_to_keep=1, max_failures=0, fail_at_step=None)
    return parse_config(values, DistillJobConfig, f"{args.distill_config} (benchmark)")


def aggregate(history: list[dict]) -> dict:
    """Samples/s over epochs 2..E: total samples / total epoch seconds (epoch 1 is warm-up)."""
    measured = history[1:]
    samples = sum(m["samples_per_s"] * m["epoch_seconds"] for m in measured)
    seconds = sum(m["epoch_seconds"] for m in measured)
    return {"samples_per_s": samples / seconds, "samples": round(samples), "seconds": seconds}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from pipeline import names, train_distill

    load_before = os.getloadavg()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="amad-train-scaling-") as scratch:
        scratch = Path(scratch)
        teacher = save_random_teacher(args.teacher_config, scratch / "teacher")
        with local_cluster(nodes=2, num_cpus=1):
            for workers in WORKER_COUNTS:
                cfg = job_config(args, scratch / "teacher", teacher["questions_per_scene"], workers)
                workdir = scratch / f"work-{workers}"
                print(f"--- {workers} worker(s): {args.epochs} epochs x {args.steps} steps x batch {args.batch_size} per worker", flush=True)
                summary = train_distill.main(cfg, workdir, tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
                history = summary["history"]
                steps = history[0][names.STEP]
                if steps != args.steps:
                    raise RuntimeError(f"{workers} workers took {steps} steps per epoch, not {args.steps}")
                runs[workers] = {
                    **aggregate(history),
                    "per_epoch": [
                        {"epoch": m[names.EPOCH], "samples_per_s": m[names.SAMPLES_PER_S], "epoch_seconds": m[names.EPOCH_SECONDS]}
                        for m in history
                    ],
                    "wall_seconds_with_startup": summary["seconds"],
                }
                student = {"heads": cfg.student.heads, "layers": cfg.student.layers, "head_dim": cfg.student.head_dim,
                           "hidden_size": cfg.student.hidden_size, "objective": cfg.objective.method}
    load_after = os.getloadavg()

    rates = {str(w): runs[w]["samples_per_s"] for w in WORKER_COUNTS}
    speedup = rates["2"] / rates["1"]
    results = {
        "samples_per_s": rates,
        "speedup_2_vs_1": speedup,
        "target": TARGET,
        "meets_target": bool(speedup >= TARGET_SPEEDUP),
        "runs": {str(w): run for w, run in runs.items()},
        "config": {
            "quick": args.quick,
            "workers": list(WORKER_COUNTS),
            "nodes": 2,
            "cpus_per_node": 1,
            "cpus_per_worker": 1,
            "threads_per_worker": 1,
            "batch_size_per_worker": args.batch_size,
            "steps_per_epoch_per_worker": args.steps,
            "epochs": args.epochs,
            "measured_epochs": list(range(2, args.epochs + 1)),
            "teacher": teacher,
            "student": student,
            "distill_config": str(args.distill_config.relative_to(ROOT) if args.distill_config.is_relative_to(ROOT) else args.distill_config),
            **run_facts(load_before, load_after),
        },
    }
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return results


def print_table(results: dict) -> None:
    config = results["config"]
    print(f"\nsamples/s, epochs {config['measured_epochs'][0]}-{config['measured_epochs'][-1]} of {config['epochs']} "
          f"(batch {config['batch_size_per_worker']} per worker, {config['steps_per_epoch_per_worker']} steps per worker per epoch)")
    print(f"{'workers':>7} | {'samples/s':>9} | {'per epoch':<28} | {'wall s incl. start-up':>21}")
    for workers, run in results["runs"].items():
        per_epoch = " ".join(f"{m['samples_per_s']:.0f}" for m in run["per_epoch"])
        print(f"{workers:>7} | {run['samples_per_s']:9.1f} | {per_epoch:<28} | {run['wall_seconds_with_startup']:21.1f}")
    print(f"speedup 2 vs 1: {results['speedup_2_vs_1']:.2f} (target {results['target']}: "
          f"{'met' if results['meets_target'] else 'NOT met'}); load average before {config['load_average_before']}, "
          f"after {config['load_average_after']}")


if __name__ == "__main__":
    main()
