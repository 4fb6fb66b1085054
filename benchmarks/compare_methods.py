"""The paper's claim on our benchmark: AMAD vs the other distillation objectives, per student head count.

Run from the repository root (``docs/claim.md`` has the commands and the wall times measured here):

    .venv/bin/python benchmarks/compare_methods.py --start pruned --tune      # tune every arm, then 3 seeds
    .venv/bin/python benchmarks/compare_methods.py --start random             # the from-scratch regime
    .venv/bin/python benchmarks/compare_methods.py --quick --out /tmp/cm.json --results-md /tmp/results.md

**Regimes** (``--start``). ``pruned`` (the setting users ship): every student is cut from the
teacher (``weights/teacher-default``: 12 heads x 4 layers) by :mod:`amad.pruning` -- its most
important heads per layer, the uniform layer map's layers (depth halved by default), the whole FFN
-- so every arm of one seed starts from the *same* pruned checkpoint; seeds change the data order.
``random``: students built from the teacher's config with random weights (seed = init and data
order), ``--head-dim`` per head.

**Arms** (:class:`amad.objective.DistillationObjective`; task weight 1 and logit-KD weight 1 in
every arm but ``task``; the arms differ only in the attention term):

* ``task``: cross-entropy only.                  * ``logit_kd``: + logit KD, no attention term.
* ``one_to_one``: teacher head k -> student head k, the extra teacher heads dropped (the paper's baseline).
* ``one_to_one_origin``: each student head learns the teacher head it was pruned from (pruned regime only).
* ``head_mean``: the teacher heads' mean map -> the student heads' mean map.
* ``relation``: MiniLMv2 self-attention relations.
* ``amad_t1``: AMAD-KL at the paper's alignment temperature 1.
* ``amad_tuned``: AMAD-KL with the temperature searched too (our extension, declared as such).
* ``amad_mse``: AMAD-MSE (Eq. 4-5) at temperature 1.

Attention terms use ``attention_normalization="per_head"`` (``--normalization``): each method's
term is a mean divergence per aligned teacher target, so one weight means the same for every arm.

**Tuning** (``--tune``, one seed, validation split). Every arm with an attention term gets the same
number of candidates, ``len(--tune-weights)``: the attention weights for arms with one setting; for
``amad_tuned`` the same weights, each paired with a temperature from ``--tune-temperatures`` in turn
(a design that spans both ranges with the same budget). The candidates of one head count train in
lockstep (split over ``--jobs`` processes); each arm keeps the candidate with the best final
validation accuracy (``<out stem>.tuning.json``; a tie keeps the earlier candidate in the grid). The
final runs then use those values with every seed and report the test split. A run is the same
computation whatever stage asked for it (the same arm, settings, head count and seed give the same
student in the same lockstep group; in another group or process it agrees to rounding, and that difference
grows through training: docs/claim.md), so every run also records its test accuracy, and the
chosen candidate's tuning run *is* that arm's final run for the tuning seed (its test accuracy took
no part in the choice); likewise a logged final run serves as a tuning candidate. Without a tuning file, weight 1 and temperature ``--sweep-temperature``.

**Budget and curves.** ``--steps`` AdamW steps of ``--batch-size`` on the teacher's training split,
warm-up then cosine decay to 0.1 lr, clip 1.0; validation accuracy every ``--eval-every`` steps is
recorded for every student (the curves show whether the budget reached a plateau).

**Recorded per run:** test accuracy overall, on relational and on non-relational questions; for
AMAD students the alignment weights on validation data: the peak (mean over teacher heads of
``max_j a_ij``; 1/Hs uniform, 1 one-hot) and, for pruned students, how much weight each kept teacher
head puts on the student head cut from it and how spread the dropped teacher heads are.

Every finished run is appended to ``<out stem>.runs.jsonl`` keyed by a hash of what its result
depends on; running the command again reuses them (``--fresh`` ignores the log), so a long
comparison survives an interrupt. ``--jobs N`` trains N lockstep groups at once, one process each of
``--threads`` threads. Writes ``--out`` (JSON) and regenerates the results page (``--results-md``,
default ``docs/results.md``) from every regime's JSON (:mod:`results_page`). ``--quick``: a random
tiny teacher, 1 seed, 20 steps: a smoke run for CI, its accuracies mean nothing.
"""

from __future__ import annotations

import argparse
import copy
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

import torch  # noqa: E402
from torch import nn  # noqa: E402

from amad.data.benchmark import BenchmarkSpec, make_split  # noqa: E402
from amad.data.text import load_tokenizer  # noqa: E402
from amad.losses import align_weights  # noqa: E402
from amad.models import StudentSpec, ViltAdapter  # noqa: E402
from amad.objective import DistillationObjective, resolve_layer_map  # noqa: E402
from amad.pruning import plan, prune_from_plan, recorded_origins, score  # noqa: E402
from amad.training import accuracy_report, predict  # noqa: E402
from pipeline import names  # noqa: E402
from pipeline.registry import file_sha256  # noqa: E402
from lockstep import train_lockstep  # noqa: E402
import results_page  # noqa: E402

ARMS = ("task", "logit_kd", "one_to_one", "one_to_one_origin", "head_mean", "relation", "amad_t1", "amad_tuned", "amad_mse")
NO_ATTENTION = ("task", "logit_kd")
DEFAULT_TEACHER = ROOT / "weights" / "teacher-default"
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_OUT = {"random": RESULTS / "compare_methods.json", "pruned": RESULTS / "compare_methods_pruned.json"}
DEFAULT_MD = ROOT / "docs" / "results.md"


def candidates(arm: str, weights: list[float], temperatures: list[float], default_temperature: float) -> list[dict]:
    """The settings an arm is tuned over: the same number for every arm with an attention term."""
    if arm in NO_ATTENTION:
        return [{}]
    if arm == "amad_tuned":
        return [{"attention_weight": w, "amad_temperature": temperatures[i % len(temperatures)]} for i, w in enumerate(weights)]
    return [{"attention_weight": w} for w in weights]


def default_params(arm: str, sweep_temperature: float) -> dict:
    if arm in NO_ATTENTION:
        return {}
    return {"attention_weight": 1.0, **({"amad_temperature": sweep_temperature} if arm == "amad_tuned" else {})}


def objective_settings(arm: str, params: dict, *, relation_heads: int, normalization: str) -> dict:
    """The arm's :class:`DistillationObjective` arguments with its (tuned) ``params``, as the job config's
    ``objective`` keys (so ``tune_configs/claim/sweep.yaml`` can be checked against them)."""
    if arm in NO_ATTENTION:  # the normalisation of an absent term changes nothing; stated so every arm's settings read alike
        return {"method": "none", "task_weight": 1.0, "logit_kd_weight": 0.0 if arm == "task" else 1.0, "attention_weight": 0.0,
                "attention_normalization": normalization}
    kd = {"task_weight": 1.0, "logit_kd_weight": 1.0, "layer_map": "uniform", "attention_normalization": normalization,
          "attention_weight": params["attention_weight"]}
    by_arm = {
        "relation": {"method": "relation", "relation_heads": relation_heads},
        "one_to_one": {"method": "one_to_one"},
        "one_to_one_origin": {"method": "one_to_one", "one_to_one_pairing": "origin"},
        "head_mean": {"method": "head_mean"},
        "amad_mse": {"method": "amad", "amad_variant": "mse", "amad_temperature": 1.0},
        "amad_t1": {"method": "amad", "amad_temperature": 1.0},
        "amad_tuned": {"method": "amad", "amad_temperature": params.get("amad_temperature", 1.0)},
    }
    return {**by_arm[arm], **kd}


def objective_for(arm: str, params: dict, *, relation_heads: int, normalization: str, origins=None) -> DistillationObjective:
    """The arm's objective with its (tuned) ``params``; ``origins`` (a pruned student's) for one_to_one_origin."""
    settings = objective_settings(arm, params, relation_heads=relation_heads, normalization=normalization)
    if settings.get("one_to_one_pairing") == "origin":
        settings["head_origins"] = origins
    return DistillationObjective(**settings)


def temperature_of(arm: str, params: dict) -> float:
    return params.get("amad_temperature", 1.0) if arm == "amad_tuned" else 1.0


def relation_heads_for(*hidden_sizes: int, wanted: int = 4) -> int:
    common = math.gcd(*hidden_sizes)
    return max(a for a in range(1, min(wanted, common) + 1) if common % a == 0)


def alignment_summary(teacher, student, split, temperature: float, examples: int = 256) -> dict[str, float]:
    """How an AMAD student's heads align with the teacher's on ``examples`` validation questions.

    ``peak``: mean over questions, layers and teacher heads of ``max_j a_ij`` (1/Hs uniform, 1 one-hot).
    For a pruned student, also: ``kept_weight`` (mean ``a_ij`` of each kept teacher head i on the
    student head j cut from it), ``kept_top`` (how often that head is i's largest weight), and for the
    teacher heads no student head came from, ``dropped_peak`` and ``dropped_entropy`` (entropy of
    their weights over student heads / log Hs: 1 = spread evenly, 0 = on one head).
    """
    batch = split.batch(torch.arange(min(examples, len(split))))
    with torch.no_grad():
        t_out = ViltAdapter.forward(teacher, batch)
        s_out = ViltAdapter.forward(student, batch)
    pairs = resolve_layer_map("uniform", teacher.config.num_hidden_layers, student.config.num_hidden_layers)
    pruned = bool(getattr(student.config, "amad_pruning", None))
    origins = recorded_origins(student) if pruned else None
    found: dict[str, list[float]] = {"peak": [], "kept_weight": [], "kept_top": [], "dropped_peak": [], "dropped_entropy": []}
    for s, t in pairs:
        a = align_weights(t_out.attentions["self"][t], s_out.attentions["self"][s], t_out.query_masks["self"], temperature=temperature)
        found["peak"].append(a.max(-1).values.mean().item())  # a: (B, Ht, Hs)
        if origins is None:
            continue
        kept = [head for _, head in origins[s]]
        for j, i in enumerate(kept):
            found["kept_weight"].append(a[:, i, j].mean().item())
            found["kept_top"].append((a[:, i].argmax(-1) == j).float().mean().item())
        hs = a.shape[-1]
        for i in (i for i in range(a.shape[1]) if i not in kept):
            found["dropped_peak"].append(a[:, i].max(-1).values.mean().item())
            if hs > 1:
                entropy = -(a[:, i] * a[:, i].clamp_min(1e-12).log()).sum(-1) / math.log(hs)
                found["dropped_entropy"].append(entropy.mean().item())
    return {key: statistics.mean(values) for key, values in found.items() if values}


def quick_teacher(directory: Path) -> Path:
    """A random teacher in the tiny preset's shape (``--quick``), saved like `amad teacher` saves one."""
    from pipeline import train_teacher
    from pipeline.config import TeacherJobConfig, load_config

    return train_teacher.save_untrained(load_config(ROOT / "tune_configs" / "tiny" / "teacher.yaml", TeacherJobConfig), directory)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", choices=("pruned", "random"), default="random", help="the regime: students pruned from the teacher, or random")
    parser.add_argument("--teacher", default=str(DEFAULT_TEACHER))
    parser.add_argument("--heads", type=int, nargs="+", default=None, help="student head counts (default 2 4 6; --quick: 2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    parser.add_argument("--methods", nargs="+", default=None, choices=ARMS, help="arms (default: all that apply to the regime)")
    parser.add_argument("--layers", type=int, default=None, help="student layers (default: pruned half the teacher's, random 2)")
    parser.add_argument("--head-dim", type=int, default=16, help="random regime only (pruned students keep the teacher's)")
    parser.add_argument("--importance-examples", type=int, default=2048, help="pruned regime: training questions scored for head importance")
    parser.add_argument("--normalization", choices=("sum", "per_head"), default="per_head")
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps per run (the budget)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=150, help="validation accuracy every N steps (the learning curves)")
    parser.add_argument("--val-questions", type=int, default=2000)
    parser.add_argument("--test-scenes", type=int, default=1000, help="x10 questions")
    parser.add_argument("--tune", action="store_true", help="first tune every arm on the validation split (one seed)")
    parser.add_argument("--tune-only", action="store_true", help="stop after tuning (with --tune): no final runs")
    parser.add_argument("--tune-seed", type=int, default=0)
    parser.add_argument("--tune-weights", type=float, nargs="+", default=[1.0, 4.0, 16.0])
    parser.add_argument("--tune-temperatures", type=float, nargs="+", default=[0.3, 0.1])
    parser.add_argument("--tuning", default=None, help="a tuning JSON to take the arms' settings from (default: <out stem>.tuning.json if present)")
    parser.add_argument("--sweep-temperature", type=float, default=0.3, help="amad_tuned's temperature when nothing was tuned")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=1, help="lockstep groups at once, one process each (--threads per process)")
    parser.add_argument("--group-size", type=int, default=0,
                        help="at most N students per lockstep group (default: tuning in --jobs groups per head count, one final group per "
                             "seed and head count); smaller groups share the teacher forward less but lose less to a kill")
    parser.add_argument("--fresh", action="store_true", help="ignore finished runs logged next to --out (default: reuse them)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="default benchmarks/results/compare_methods[_pruned].json")
    parser.add_argument("--results-md", default=str(DEFAULT_MD))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.warmup, args.test_scenes, args.eval_every = 20, 16, 2, 20, 10
        args.val_questions, args.importance_examples = min(args.val_questions, 100), min(args.importance_examples, 64)
    args.heads = args.heads or ([2] if args.quick else [2, 4, 6])
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    applicable = [arm for arm in ARMS if args.start == "pruned" or arm != "one_to_one_origin"]
    if args.group_size < 0:
        parser.error(f"--group-size {args.group_size}: give a positive number of students, or 0 for the default groups")
    if args.methods and "one_to_one_origin" in args.methods and args.start != "pruned":
        parser.error("one_to_one_origin needs students pruned from the teacher (--start pruned): a random student has no origin heads")
    args.methods = args.methods or applicable
    args.out = args.out or str(DEFAULT_OUT[args.start])
    return args


def run_key(args, teacher_dir: Path, layers: int) -> str:
    """What a finished run's result depends on, besides its arm, settings, heads and seed."""
    teacher = "random tiny (quick)" if args.quick else file_sha256(teacher_dir / "model.safetensors")
    settings = {"teacher": teacher, "start": args.start, "layers": layers, "head_dim": args.head_dim if args.start == "random" else None,
                "importance_examples": args.importance_examples if args.start == "pruned" else None, "normalization": args.normalization,
                "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup, "test_scenes": args.test_scenes,
                "val_questions": args.val_questions, "eval_every": args.eval_every}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def run_id(arm: str, params: dict, heads: int, seed: int) -> str:
    """A run's identity under one run key; the stage that asked for it is not part of it (see the module doc)."""
    return json.dumps([arm, params, heads, seed], sort_keys=True)


def complete_for(stage: str, record: dict | None) -> bool:
    """Whether a logged run serves ``stage``: tuning needs its validation accuracy, a final run its test split
    (runs logged before tuning runs recorded the test split have validation only)."""
    return record is not None and (stage == "tune" or "test" in record)


def remember(done: dict[str, dict], record: dict) -> None:
    """Log ``record`` in ``done`` unless a record of the same run with more in it is there."""
    rid = run_id(record["arm"], record["params"], record["heads"], record["seed"])
    if not complete_for("final", done.get(rid)) or complete_for("final", record):
        done[rid] = record


def read_run_log(path: Path, key: str) -> dict[str, dict]:
    """Finished runs recorded under ``key``; a line cut short by a kill is skipped, other keys are kept in the file."""
    done: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("key") == key and "stage" in record:
                remember(done, record)
    return done


_WORKER: dict = {}


def _load_world(teacher_dir: Path, args) -> dict:
    teacher = ViltAdapter.load(teacher_dir).eval()
    spec = BenchmarkSpec.from_dict(json.loads((teacher_dir / names.BENCHMARK_FILE).read_text()))
    tokenizer = load_tokenizer(teacher_dir)
    train = make_split(spec, "train", tokenizer)
    val = make_split(spec, "val", tokenizer)
    world = {
        "args": args, "teacher": teacher, "train": train,
        "val": val.subset(torch.arange(min(args.val_questions, len(val)))),
        "test": make_split(replace(spec, test_scenes=args.test_scenes), "test", tokenizer),
    }
    if args.start == "pruned":  # scored once, deterministically: every arm and seed starts from the same cut
        world["importance"] = score(teacher, train.subset(torch.arange(min(args.importance_examples, len(train)))).batches(128))
    return world


def student_layers(args, teacher) -> int:
    if args.layers:
        return args.layers
    return max(1, teacher.config.num_hidden_layers // 2) if args.start == "pruned" else 2


def initial_student(world: dict, heads: int, seed: int) -> nn.Module:
    args, teacher = world["args"], world["teacher"]
    layers = student_layers(args, teacher)
    if args.start == "pruned":
        return prune_from_plan(teacher, plan(world["importance"], heads, layers, 1.0))
    return ViltAdapter.build(ViltAdapter.student_config(teacher.config, StudentSpec(heads, layers, args.head_dim)), seed=seed)


def per_type(report: dict) -> dict[str, float]:
    """``{question type: accuracy}`` from an ``accuracy_report`` (its ``acc/<type>`` keys), rounded for the run log."""
    return {key.split("/", 1)[1]: round(value, 6) for key, value in report.items() if key.startswith("acc/")}


POSITIONAL_TYPES = ("left_half", "top_half", "left_of")  # the question types a pruned student's plateau leaves at chance
LEARNED = 0.8  # a type counts as learned from the first validation point at or above this accuracy


def positional_escape(record: dict) -> dict | None:
    """When one run learned to read positions: per positional type, the first validation step whose accuracy on it
    reached :data:`LEARNED` (None: never within the budget), and its test accuracy; ``escaped`` when every
    positional type is at or above :data:`LEARNED` on the test split. None for a run logged before the run log
    kept question types."""
    curve, tested = record.get("type_curve"), (record.get("test") or {}).get("per_type")
    if not curve or not tested:
        return None
    first = {kind: next((step for step, accuracies in curve if accuracies.get(kind, 0.0) >= LEARNED), None) for kind in POSITIONAL_TYPES}
    test = {kind: tested.get(kind) for kind in POSITIONAL_TYPES}
    return {"first_step": first, "test": test, "escaped": all(value is not None and value >= LEARNED for value in test.values())}


def _init_worker(teacher_dir: str, args) -> None:
    torch.set_num_threads(max(1, args.threads or 1))
    _WORKER.update(_load_world(Path(teacher_dir), args))


def run_group(task: tuple, world: dict | None = None) -> list[dict]:
    """Train the students of one group in lockstep and evaluate them; one record per student.

    ``task``: ``(stage, heads, seed, ((arm, params), ...))``. Every record has the validation curve,
    the test split and, for AMAD arms, the alignment summary, whatever the stage (which is recorded).
    """
    world = world or _WORKER
    args, teacher = world["args"], world["teacher"]
    stage, heads, seed, members = task
    clock = time.perf_counter()
    start = initial_student(world, heads, seed)
    origins = recorded_origins(start) if args.start == "pruned" else None
    relation_heads = relation_heads_for(teacher.config.hidden_size, start.config.hidden_size)
    names_ = [f"{arm}#{index}" for index, (arm, _) in enumerate(members)]
    objectives = {name: objective_for(arm, params, relation_heads=relation_heads, normalization=args.normalization, origins=origins)
                  for name, (arm, params) in zip(names_, members)}
    students = {name: copy.deepcopy(start) for name in names_}  # every arm from the same weights
    curves: dict[str, list[list[float]]] = {name: [] for name in names_}
    # per question type: the plateau some runs sit on is a few types at chance, so the curves keep them
    type_curves: dict[str, list[list]] = {name: [] for name in names_}

    def record_curves(step: int, trained: dict[str, nn.Module]) -> None:
        for name, student in trained.items():
            report = accuracy_report(predict(student, ViltAdapter, world["val"])[0], world["val"])
            curves[name].append([step, round(report["accuracy"], 6)])
            type_curves[name].append([step, per_type(report)])

    trained = train_lockstep(teacher, students, objectives, world["train"], steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             warmup=args.warmup, seed=seed, every=args.eval_every, on_step=record_curves)
    records = []
    for name, (arm, params) in zip(names_, members):
        student = trained[name]
        record = {"stage": stage, "arm": arm, "params": params, "heads": heads, "seed": seed,
                  "val_accuracy": curves[name][-1][1], "curve": curves[name], "type_curve": type_curves[name]}
        report = accuracy_report(predict(student, ViltAdapter, world["test"])[0], world["test"])
        record["test"] = {k: report[k] for k in ("accuracy", "relational_accuracy", "nonrelational_accuracy") if k in report}
        record["test"]["per_type"] = per_type(report)
        if arm.startswith("amad"):
            record["alignment"] = alignment_summary(teacher, student, world["val"], temperature_of(arm, params))
        records.append(record)
    seconds = round(time.perf_counter() - clock, 1)
    for record in records:
        record.update(group_seconds=seconds, group_size=len(members))
    return records


def run_groups(groups: list[tuple], world: dict, args, teacher_dir: Path, finished, worker=None, initializer=None) -> None:
    """Train ``groups`` in this process (``--jobs 1``) or in ``--jobs`` worker processes, calling ``finished`` per record.

    ``worker(group, world)`` / ``initializer(teacher_dir, args)``: another script's (``compare_captioning.py``); default this one's.
    """
    worker, initializer = worker or run_group, initializer or _init_worker
    if args.jobs == 1 or len(groups) <= 1:
        for group in groups:
            for record in worker(group, world):
                finished(record)
        return
    context = multiprocessing.get_context("spawn")  # no forked torch/OpenMP state
    with context.Pool(min(args.jobs, len(groups)), initializer=initializer, initargs=(str(teacher_dir), args)) as pool:
        for records in pool.imap_unordered(worker, groups):
            for record in records:
                finished(record)


def parts_for(items: list, args) -> int:
    """How many lockstep groups ``items`` need under ``--group-size`` (1 without it)."""
    return math.ceil(len(items) / args.group_size) if args.group_size > 0 else 1


def split_evenly(items: list, parts: int) -> list[list]:
    parts = max(1, min(parts, len(items)))
    return [items[i::parts] for i in range(parts)]


def tuning_records(logged, grid: list[tuple[str, str]], seed: int) -> list[dict]:
    """The logged runs that make up a tuning, in the grid's order (the tie rule of :func:`choose`).

    ``grid``: ``(arm, json of its params)`` of every candidate. A head count and arm count as tuned only
    when every candidate of the arm's grid is logged with ``seed``: a lone default-weight final run
    (itself a grid member) is not a tuning.
    """
    logged = [r for r in logged if r["seed"] == seed and (r["arm"], json.dumps(r["params"], sort_keys=True)) in grid]
    wanted = {arm: sum(1 for a, _ in grid if a == arm) for arm, _ in grid}
    found: dict[tuple[int, str], int] = {}
    for r in logged:
        found[(r["heads"], r["arm"])] = found.get((r["heads"], r["arm"]), 0) + 1
    return sorted((r for r in logged if found[(r["heads"], r["arm"])] == wanted[r["arm"]]),
                  key=lambda r: grid.index((r["arm"], json.dumps(r["params"], sort_keys=True))))


def choose(tuning_records: list[dict], arms, heads: list[int]) -> dict[str, dict[str, dict]]:
    """Per head count and arm, the candidate with the best final validation accuracy (the first on a tie)."""
    chosen: dict[str, dict[str, dict]] = {}
    for h in heads:
        for arm in arms:
            runs = [r for r in tuning_records if r["heads"] == h and r["arm"] == arm]
            if runs:
                best = max(runs, key=lambda r: r["val_accuracy"])  # max keeps the first of equals
                chosen.setdefault(str(h), {})[arm] = best["params"]
    return chosen


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = Path(args.out)
    log_path = out.with_name(out.stem + ".runs.jsonl")
    tuning_path = Path(args.tuning) if args.tuning else out.with_name(out.stem + ".tuning.json")
    with tempfile.TemporaryDirectory() as scratch:
        teacher_dir = quick_teacher(Path(scratch)) if args.quick else Path(args.teacher)
        world = _load_world(teacher_dir, args)
        layers = student_layers(args, world["teacher"])
        key = run_key(args, teacher_dir, layers)
        done = {} if args.fresh else read_run_log(log_path, key)
        out.parent.mkdir(parents=True, exist_ok=True)
        reused = 0

        def finished(record: dict) -> None:
            record["key"] = key
            remember(done, record)
            with log_path.open("a") as log:  # one line per run, flushed: a kill loses at most the group in flight
                log.write(json.dumps(record) + "\n")
            shown = record.get("test", {}).get("accuracy", record["val_accuracy"])
            print(f"{record['stage']:5} {record['arm']:17} {json.dumps(record['params']):48} heads {record['heads']} seed {record['seed']}: "
                  f"{'test' if 'test' in record else 'val'} accuracy {shown:.2%} (group of {record['group_size']}: {record['group_seconds']:.0f} s)",
                  flush=True)

        def pending(stage: str, members: list[tuple[str, dict]], h: int, seed: int) -> list[tuple[str, dict]]:
            nonlocal reused
            todo = [m for m in members if not complete_for(stage, done.get(run_id(m[0], m[1], h, seed)))]
            reused += len(members) - len(todo)
            return todo

        tuning = None
        if args.tune:
            groups = []
            for h in args.heads:
                members = [(arm, params) for arm in args.methods if arm not in NO_ATTENTION
                           for params in candidates(arm, args.tune_weights, args.tune_temperatures, args.sweep_temperature)]
                todo = pending("tune", members, h, args.tune_seed)
                groups += [("tune", h, args.tune_seed, tuple(chunk)) for chunk in split_evenly(todo, max(args.jobs, parts_for(todo, args))) if chunk]
            print(f"tuning: {sum(len(g[3]) for g in groups)} candidate runs to train in {len(groups)} lockstep group(s)", flush=True)
            run_groups(groups, world, args, teacher_dir, finished)
            # every head count tuned under this key so far (earlier commands' too), this command's candidates only
            grid = [(arm, json.dumps(params, sort_keys=True)) for arm in args.methods if arm not in NO_ATTENTION
                    for params in candidates(arm, args.tune_weights, args.tune_temperatures, args.sweep_temperature)]
            records = tuning_records(done.values(), grid, args.tune_seed)
            tuned_heads = sorted({r["heads"] for r in records})
            tuning = {"chosen": choose(records, args.methods, tuned_heads), "weights": args.tune_weights, "temperatures": args.tune_temperatures,
                      "seed": args.tune_seed, "run_key": key,
                      "candidates": {str(h): {arm: [{"params": r["params"], "val_accuracy": r["val_accuracy"], "curve": r["curve"]}
                                                    for r in records if r["heads"] == h and r["arm"] == arm]
                                              for arm in args.methods if arm not in NO_ATTENTION} for h in tuned_heads},
                      "train_seconds": results_page.run_seconds(records),
                      "command": ("python benchmarks/compare_methods.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()}
            tuning_path.write_text(json.dumps(tuning, indent=2) + "\n")
            if args.tune_only:
                print(f"wrote {tuning_path} (--tune-only: no final runs)")
                return tuning
        elif tuning_path.is_file():
            tuning = json.loads(tuning_path.read_text())
            if tuning.get("run_key") != key:
                print(f"note: {tuning_path} was tuned with other settings (run key {tuning.get('run_key')} != {key}); using it anyway", flush=True)

        def params_for(arm: str, h: int) -> dict:
            chosen = (tuning or {}).get("chosen", {}).get(str(h), {})
            return chosen.get(arm, default_params(arm, args.sweep_temperature))

        groups = []
        for seed in args.seeds:  # seed-major: an interrupt leaves whole seeds of the table
            for h in args.heads:
                todo = pending("final", [(arm, params_for(arm, h)) for arm in args.methods], h, seed)
                if todo:
                    groups += [("final", h, seed, tuple(chunk)) for chunk in split_evenly(todo, parts_for(todo, args))]
        print(f"final: {len(args.methods) * len(args.heads) * len(args.seeds)} runs, {sum(len(g[3]) for g in groups)} to train in "
              f"{len(groups)} lockstep group(s) on {args.jobs} process(es); {reused} reused from {log_path}", flush=True)
        run_groups(groups, world, args, teacher_dir, finished)
        test = world["test"]
        teacher_report = accuracy_report(predict(world["teacher"], ViltAdapter, test)[0], test)

    finals = {(r["arm"], r["heads"], r["seed"]): r for r in done.values()
              if complete_for("final", r) and r["params"] == params_for(r["arm"], r["heads"])}
    runs = [finals[(arm, h, s)] for arm in args.methods for h in args.heads for s in args.seeds]

    def per_seed(field: str) -> dict:
        return {arm: {str(h): [finals[(arm, h, s)]["test"].get(field) for s in args.seeds] for h in args.heads} for arm in args.methods}

    results = {
        "regime": args.start,
        "accuracy": per_seed("accuracy"),
        "relational_accuracy": per_seed("relational_accuracy"),
        "nonrelational_accuracy": per_seed("nonrelational_accuracy"),
        "curves": {arm: {str(h): [finals[(arm, h, s)]["curve"] for s in args.seeds] for h in args.heads} for arm in args.methods},
        "positional": {arm: {str(h): [positional_escape(finals[(arm, h, s)]) for s in args.seeds] for h in args.heads} for arm in args.methods},
        "alignment": {arm: {str(h): [finals[(arm, h, s)]["alignment"] for s in args.seeds] for h in args.heads}
                      for arm in args.methods if arm.startswith("amad")},
        "params": {arm: {str(h): params_for(arm, h) for h in args.heads} for arm in args.methods},
        "tuning": tuning,
        "teacher": {"accuracy": teacher_report["accuracy"], "relational_accuracy": teacher_report.get("relational_accuracy"),
                    "heads": world["teacher"].config.num_attention_heads, "layers": world["teacher"].config.num_hidden_layers},
        "seconds": time.perf_counter() - started,
        "reused_runs": reused,
        "train_seconds": results_page.run_seconds(runs),
        "config": {
            "teacher": "random tiny (quick)" if args.quick else _shown(Path(args.teacher)), "start": args.start,
            "heads": args.heads, "seeds": args.seeds, "methods": args.methods, "layers": layers,
            "head_dim": args.head_dim if args.start == "random" else None, "normalization": args.normalization,
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup, "eval_every": args.eval_every,
            "val_questions": len(world["val"]), "test_questions": len(test), "quick": args.quick, "threads": torch.get_num_threads(),
            "jobs": args.jobs, "cpu_count": os.cpu_count(), "run_key": key, "torch": torch.__version__, "machine": platform.machine(),
        },
    }
    results["command"] = ("python benchmarks/compare_methods.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    out.write_text(json.dumps(results, indent=2) + "\n")
    defaults = [p.resolve() for p in results_page.DEFAULT_SOURCES]
    sources = list(results_page.DEFAULT_SOURCES) if not args.quick and out.resolve() in defaults else [out]
    results_page.write_page(Path(args.results_md), [json.loads(p.read_text()) for p in sources if p.is_file()])
    print(f"wrote {out} and {args.results_md}")
    return results


def _shown(path: Path) -> str:
    """A path as the docs show it: relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


if __name__ == "__main__":
    main()
