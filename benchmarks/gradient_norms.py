"""Why AMAD-KL does not respond to its weight: each loss term's gradient along the claim's own runs.

Run from the repository root (``docs/claim.md`` has the command and the figures measured here):

    .venv/bin/python benchmarks/gradient_norms.py --heads 4 --seed 0 --stop-at 3000

It trains, in lockstep, the students of ``compare_methods.py --start pruned --tune --heads 4 --steps 4000``
for the arms asked (default AMAD-KL tau = 1, one-to-one by origin and head-mean, each at the attention weight
its tuning chose: ``--tuning``), with the same pruned start, seed, data order and schedule, so they are the
same students as that comparison's logged runs (training is deterministic on CPU; the script checks its
validation accuracies against the run log's curves and says whether they match). ``--stop-at`` ends the
runs early on the 4,000-step schedule.

Every ``--every`` steps (and at step 0) it takes the gradient of each *unweighted* term of every student's
objective -- task loss, logit KD, attention term -- with respect to the student's parameters, summed over the
same ``--probe-examples`` training questions (batches of the training batch size, in order), and records

* ``norm``: the L2 norm of each term's gradient (``attention_weighted``: times the arm's weight);
* ``share``: ``|| w * g_attention || / || g_total ||``, how much of the update's direction the attention
  term can move (``g_total`` = the gradient of the weighted loss the optimiser sees, before clipping);
* ``cosine``: between the attention term's gradient and the task's, and the logit KD's;
* the attention term's value and the validation accuracy at that step (with the positional question types).

Writes ``--out`` (JSON with the command) and prints a table per arm.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import amad  # noqa: F401  (is the package importable?)
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:  # sibling helpers: the folder is not a package
    sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import compare_methods as cm  # noqa: E402
from amad.models import ViltAdapter  # noqa: E402
from amad.objective import DistillationObjective  # noqa: E402
from amad.pruning import recorded_origins  # noqa: E402
from amad.training import accuracy_report, predict  # noqa: E402
from lockstep import train_lockstep  # noqa: E402

TERMS = ("task", "logit_kd", "attention")
DEFAULT_OUT = cm.RESULTS / "gradient_norms.json"
DEFAULT_TUNING = cm.RESULTS / "compare_methods_pruned_4000steps.tuning.json"
DEFAULT_ARMS = ("amad_t1", "one_to_one_origin", "head_mean")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(cm.DEFAULT_TEACHER))
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=[a for a in cm.ARMS if a not in cm.NO_ATTENTION])
    parser.add_argument("--tuning", default=str(DEFAULT_TUNING), help="the tuning JSON whose chosen settings the arms use")
    parser.add_argument("--attention-weight", type=float, default=None,
                        help="every arm at this attention weight instead of its chosen one (e.g. the grid's other end)")
    parser.add_argument("--steps", type=int, default=4000, help="the schedule's length (compare_methods' --steps)")
    parser.add_argument("--stop-at", type=int, default=None, help="stop after this many steps of the schedule (default: all)")
    parser.add_argument("--every", type=int, default=250, help="measure every N steps (a multiple of the run log's --eval-every to compare)")
    parser.add_argument("--probe-examples", type=int, default=512, help="training questions the gradients are summed over")
    parser.add_argument("--run-log", default=str(cm.RESULTS / "compare_methods_pruned_4000steps.runs.jsonl"),
                        help="compare_methods' run log to check the validation accuracies against ('' to skip)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a random tiny teacher and 6 steps: a smoke run, its numbers mean nothing")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    if args.every < 1 or args.probe_examples < 1:
        parser.error("--every and --probe-examples must be positive")
    return args


def flat(grads, params) -> torch.Tensor:
    """One vector of a term's gradient; a parameter the term does not reach contributes zeros."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def term_gradients(teacher: nn.Module, student: nn.Module, objective: DistillationObjective, batches: list[dict]) -> dict:
    """Each unweighted term's gradient w.r.t. ``student``'s trainable parameters, summed over ``batches``
    (flat vectors of ``(P,)``), and each term's mean value; terms the objective does not use are absent."""
    params = [p for p in student.parameters() if p.requires_grad]
    weights = {"task": objective.task_weight, "logit_kd": objective.logit_kd_weight, "attention": objective.attention_weight}
    used = [term for term in TERMS if weights[term] != 0]
    grads = {term: torch.zeros(sum(p.numel() for p in params)) for term in used}
    values = {term: 0.0 for term in used}
    for batch in batches:
        with torch.no_grad():
            t_out = ViltAdapter.forward(teacher, batch, need_attentions=True, need_qkv=objective.needs_qkv)
        s_out = ViltAdapter.forward(student, batch, need_attentions=True, need_qkv=objective.needs_qkv)
        parts = objective(t_out, s_out, batch["labels"])
        for index, term in enumerate(used):
            found = torch.autograd.grad(parts[term], params, retain_graph=index < len(used) - 1, allow_unused=True)
            grads[term] += flat(found, params)
            values[term] += parts[term].item() / len(batches)
    return {"grads": grads, "values": values, "weights": {term: weights[term] for term in used}}


def summarise(measured: dict) -> dict:
    """Norms, the attention term's share of the total gradient and its cosines with the other terms."""
    grads, weights = measured["grads"], measured["weights"]
    total = sum(weights[term] * grads[term] for term in grads)
    norm = {term: grads[term].norm().item() for term in grads}
    out = {"norm": norm, "total_norm": total.norm().item(), "values": measured["values"]}
    if "attention" in grads:
        attention = grads["attention"]
        out["norm"]["attention_weighted"] = weights["attention"] * norm["attention"]
        out["share"] = out["norm"]["attention_weighted"] / max(out["total_norm"], 1e-30)
        out["cosine"] = {term: nn.functional.cosine_similarity(attention, grads[term], dim=0).item() for term in grads if term != "attention"}
    return out


def logged_curves(path: str, key: str, arms: dict, heads: int, seed: int) -> dict[str, dict[int, float]]:
    """``{arm: {step: val accuracy}}`` of the logged runs with the same arm, settings, head count and seed."""
    if not path or not Path(path).is_file():
        return {}
    done = cm.read_run_log(Path(path), key)
    found = {}
    for arm, params in arms.items():
        record = done.get(cm.run_id(arm, params, heads, seed))
        if record:
            found[arm] = {int(step): accuracy for step, accuracy in record["curve"]}
    return found


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cm_argv = ["--start", "pruned", "--heads", str(args.heads), "--seeds", str(args.seed), "--steps", str(args.steps),
               "--eval-every", str(args.every), "--teacher", args.teacher, "--threads", str(args.threads)]
    if args.quick:
        cm_argv.append("--quick")
    cm_args = cm.parse_args(cm_argv)
    teacher_dir = Path(cm_args.teacher) if not args.quick else cm.quick_teacher(Path(args.out).with_suffix(".teacher"))
    if args.quick:
        args.steps, args.every, args.probe_examples = cm_args.steps, 2, min(args.probe_examples, 32)
        args.stop_at = min(args.stop_at or 6, 6)
    chosen = json.loads(Path(args.tuning).read_text())["chosen"].get(str(args.heads), {}) if Path(args.tuning).is_file() and not args.quick else {}
    params = {arm: chosen.get(arm) or cm.default_params(arm, cm_args.sweep_temperature) for arm in args.arms}
    if args.attention_weight is not None:
        params = {arm: {**values, "attention_weight": args.attention_weight} for arm, values in params.items()}
    world = cm._load_world(teacher_dir, cm_args)
    teacher = world["teacher"]
    start = cm.initial_student(world, args.heads, args.seed)
    origins = recorded_origins(start)
    relation_heads = cm.relation_heads_for(teacher.config.hidden_size, start.config.hidden_size)
    objectives = {arm: cm.objective_for(arm, params[arm], relation_heads=relation_heads, normalization=cm_args.normalization, origins=origins)
                  for arm in args.arms}
    students = {arm: copy.deepcopy(start) for arm in args.arms}  # every arm from the same pruned weights
    probe = list(world["train"].subset(torch.arange(min(args.probe_examples, len(world["train"])))).batches(cm_args.batch_size))
    points: dict[str, list[dict]] = {arm: [] for arm in args.arms}

    def measure(step: int, trained: dict[str, nn.Module]) -> None:
        for arm, student in trained.items():
            report = accuracy_report(predict(student, ViltAdapter, world["val"])[0], world["val"])
            point = {"step": step, "val_accuracy": round(report["accuracy"], 6),
                     "positional": {kind: round(report.get(f"acc/{kind}", float("nan")), 6) for kind in cm.POSITIONAL_TYPES},
                     **summarise(term_gradients(teacher, student, objectives[arm], probe))}
            points[arm].append(point)
            print(f"step {step:5d} {arm:18s} val {point['val_accuracy']:.4f}  |g| task {point['norm'].get('task', 0):.3g}"
                  f" kd {point['norm'].get('logit_kd', 0):.3g} att(w) {point['norm'].get('attention_weighted', 0):.3g}"
                  f" share {point.get('share', 0):.3f}", flush=True)

    measure(0, {arm: student.eval() for arm, student in students.items()})
    train_lockstep(teacher, students, objectives, world["train"], steps=args.steps, batch_size=cm_args.batch_size, lr=cm_args.lr,
                   warmup=cm_args.warmup, seed=args.seed, every=args.every, on_step=measure, stop_at=args.stop_at)
    key = cm.run_key(cm_args, teacher_dir, cm.student_layers(cm_args, teacher))
    logged = logged_curves(args.run_log, key, params, args.heads, args.seed) if not args.quick else {}
    reproduced = {arm: all(abs(logged[arm][p["step"]] - p["val_accuracy"]) < 1e-6 for p in points[arm] if p["step"] in logged[arm])
                  for arm in logged}
    result = {
        "command": " ".join(["python", "benchmarks/gradient_norms.py", *(argv if argv is not None else sys.argv[1:])]),
        "teacher": str(teacher_dir), "heads": args.heads, "seed": args.seed, "steps": args.steps, "stop_at": args.stop_at,
        "probe_examples": len(probe) * cm_args.batch_size if probe else 0, "params": params,
        "reproduces_run_log": reproduced, "points": points,
        "seconds": round(time.perf_counter() - started, 1), "threads": args.threads,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or platform.machine()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return result


def print_table(result: dict) -> None:
    for arm, points in result["points"].items():
        print(f"\n{arm} {result['params'][arm]} (reproduces the run log: {result['reproduces_run_log'].get(arm, 'not logged')})")
        print("| step | val acc | left_half | top_half | left_of | task | logit KD | attention x w | share | cos(att, task) | cos(att, KD) |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for p in points:
            pos = [p["positional"][kind] for kind in cm.POSITIONAL_TYPES]
            print(f"| {p['step']} | {p['val_accuracy']:.3f} | " + " | ".join(f"{v:.2f}" for v in pos) +
                  f" | {p['norm'].get('task', 0):.3g} | {p['norm'].get('logit_kd', 0):.3g} | {p['norm'].get('attention_weighted', 0):.3g}"
                  f" | {p.get('share', 0):.3f} | {p.get('cosine', {}).get('task', 0):+.3f} | {p.get('cosine', {}).get('logit_kd', 0):+.3f} |")


if __name__ == "__main__":
    main()
