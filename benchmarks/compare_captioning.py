"""The paper's claim on captioning (issue 24): AMAD vs one-to-one and logit KD for captioners with fewer heads.

Run from the repository root:

    .venv/bin/python benchmarks/compare_captioning.py --teacher weights/captioner-default --tune --jobs 2 --threads 1
    .venv/bin/python benchmarks/compare_captioning.py --teacher weights/captioner-default --start random --tune --jobs 2 --threads 1
    .venv/bin/python benchmarks/compare_captioning.py --quick --out /tmp/cc.json     # a random tiny captioner: a smoke run

**Students** are pruned from the captioning teacher (:mod:`amad.pruning_ved`): ``--heads`` heads of each
kind (encoder, decoder self-attention, cross-attention) in each kept layer, half of each stack's layers
(``--layers``), the whole FFN; every arm of a head count starts from the same pruned checkpoint and
seeds change the data order (as ``compare_methods.py --start pruned``). ``--start random``: the same
architecture (the pruned student's shapes: heads, layers, FFN, hidden size) with random weights, the seed
choosing the initialisation and the data order; no head has an origin there, so the by-origin arms are
left out. Results go to ``compare_captioning.json`` and ``compare_captioning_random.json``.

**Arms** (task weight 1; logit-KD weight 1 in every arm but ``task``; per-token losses over real tokens):
``task``; ``logit_kd``; and, each on **all three kinds** (``/all``: encoder self, decoder self, cross)
and on **cross-attention only** (``/cross``): ``one_to_one`` (by index), ``one_to_one_origin`` (each
student head learns the teacher head it was cut from, per kind), ``amad_t1`` (AMAD-KL, the paper's
temperature 1) and ``amad_tuned`` (AMAD-KL with the temperature searched too: our extension). Attention
terms are normalised per aligned teacher head and averaged over the aligned kinds.

**Tuning** (``--tune``): the same design as ``compare_methods.py``: every arm with an attention term gets
``len(--tune-weights)`` candidates on the validation split with one seed (``amad_tuned`` pairs the
weights with ``--tune-temperatures``), chosen by validation CIDEr-D (ties: the grid's first); the chosen candidate's run is reused as its
seed-0 final run, not trained again. ``<out stem>.tuning.json`` keeps the choice, every candidate's validation
CIDEr-D and curve, and the candidates' training time. **Scores**: CIDEr-D and BLEU-4 (and the rest of
:func:`amad.metrics.caption_scores`) of greedy captions on the test split; validation CIDEr-D every
``--eval-every`` steps (the curves). Every run is logged to ``<out stem>.runs.jsonl`` and reused.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import amad  # noqa: F401
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from amad.captioning import caption_report  # noqa: E402
from amad.data.captions import CaptionSpec, CaptionSplit, caption_training_set, make_caption_split  # noqa: E402
from amad.data.scenes import SceneSpec  # noqa: E402
from amad.data.text import CLS, PAD, SEP, load_tokenizer, save_tokenizer  # noqa: E402
from amad.data.captions import caption_tokenizer  # noqa: E402
from amad.models_ved import VedAdapter  # noqa: E402
from amad.objective import DistillationObjective  # noqa: E402
from amad.pruning_ved import plan, prune_from_plan, recorded_origins, score  # noqa: E402
from pipeline.registry import file_sha256  # noqa: E402
from lockstep import train_lockstep  # noqa: E402
import compare_methods  # noqa: E402
import results_page  # noqa: E402
from compare_methods import candidates, split_evenly  # noqa: E402

KINDS = ("encoder_self", "decoder_self", "cross")
SCOPES = {"all": KINDS, "cross": ("cross",)}
METHODS = ("one_to_one", "one_to_one_origin", "amad_t1", "amad_tuned")
ARMS = ("task", "logit_kd", *(f"{method}/{scope}" for method in METHODS for scope in SCOPES))
NO_ATTENTION = ("task", "logit_kd")
CAPTIONS_FILE = "captions.json"
DEFAULT_OUT = {"pruned": ROOT / "benchmarks" / "results" / "compare_captioning.json",
               "random": ROOT / "benchmarks" / "results" / "compare_captioning_random.json"}


def objective_for(arm: str, params: dict, origins: dict | None) -> DistillationObjective:
    """The arm's objective; ``origins`` (the pruned student's, per kind) for the by-origin arms."""
    if arm in NO_ATTENTION:
        return DistillationObjective(method="none", task_weight=1.0, logit_kd_weight=0.0 if arm == "task" else 1.0, attention_weight=0.0)
    method, scope = arm.split("/")
    kinds = SCOPES[scope]
    common = {"task_weight": 1.0, "logit_kd_weight": 1.0, "attention_weight": params["attention_weight"], "kinds": kinds,
              "layer_map": "uniform", "attention_normalization": "per_head"}
    if method == "one_to_one":
        return DistillationObjective(method="one_to_one", **common)
    if method == "one_to_one_origin":
        return DistillationObjective(method="one_to_one", one_to_one_pairing="origin", head_origins={k: origins[k] for k in kinds}, **common)
    return DistillationObjective(method="amad", amad_temperature=params.get("amad_temperature", 1.0), **common)


def method_of(arm: str) -> str:
    """The arm's method as :func:`compare_methods.candidates` knows it (its tuning grid)."""
    return arm if arm in NO_ATTENTION else arm.split("/")[0]


def quick_teacher(directory: Path) -> Path:
    """A random tiny captioner saved as `amad teacher` saves one (--quick)."""
    tokenizer = caption_tokenizer()
    spec = CaptionSpec(train_scenes=48, val_scenes=8, test_scenes=8, references_per_image=2,
                       scene=SceneSpec(grid=4, cell=8, min_objects=3, max_objects=4))
    config = VedAdapter.teacher_config(vocab_size=tokenizer.get_vocab_size(), image_size=32, patch_size=8,
                                       max_caption_length=spec.max_caption_length, pad_token_id=tokenizer.token_to_id(PAD),
                                       bos_token_id=tokenizer.token_to_id(CLS), eos_token_id=tokenizer.token_to_id(SEP),
                                       hidden_size=32, heads=4, layers=2)
    VedAdapter.build(config, seed=0).save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    (directory / CAPTIONS_FILE).write_text(json.dumps(spec.to_dict()))
    return directory


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(ROOT / "weights" / "captioner-default"), help="a captioner saved by `amad teacher` (model.family: ved)")
    parser.add_argument("--start", choices=("pruned", "random"), default="pruned",
                        help="students pruned from the teacher, or of the same shapes with random weights")
    parser.add_argument("--heads", type=int, nargs="+", default=None, help="student heads per kind and layer (default 2 4 6; --quick: 2)")
    parser.add_argument("--layers", type=int, default=None, help="layers per stack (default: half the teacher's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0)")
    parser.add_argument("--methods", nargs="+", default=None, choices=ARMS)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--val-images", type=int, default=200, help="validation images decoded for the curves and the tuning")
    parser.add_argument("--importance-pairs", type=int, default=1024, help="training pairs that score the teacher's heads")
    parser.add_argument("--tune", action="store_true")
    parser.add_argument("--tune-seed", type=int, default=0)
    parser.add_argument("--tune-weights", type=float, nargs="+", default=[0.25, 1.0, 4.0])
    parser.add_argument("--tune-temperatures", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--default-temperature", type=float, default=0.3, help="amad_tuned's temperature when nothing was tuned")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="default benchmarks/results/compare_captioning[_random].json")
    args = parser.parse_args(argv)
    origin_arms = [arm for arm in ARMS if arm.startswith("one_to_one_origin/")]
    if args.start == "random" and args.methods and set(args.methods) & set(origin_arms):
        parser.error(f"{sorted(set(args.methods) & set(origin_arms))} need students pruned from the teacher (--start pruned): "
                     "a random student's heads have no origin")
    args.out = args.out or str(DEFAULT_OUT[args.start])
    if args.quick:
        args.steps, args.eval_every, args.warmup, args.batch_size = 12, 6, 2, 16
        args.val_images, args.importance_pairs = 8, 32
    args.heads = args.heads or ([2] if args.quick else [2, 4, 6])
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.methods = args.methods or [arm for arm in ARMS if args.start == "pruned" or arm not in origin_arms]
    return args


def _load_world(teacher_dir: Path, args) -> dict:
    teacher = VedAdapter.load(teacher_dir).eval()
    spec = CaptionSpec.from_dict(json.loads((teacher_dir / CAPTIONS_FILE).read_text()))
    tokenizer = load_tokenizer(teacher_dir)
    train_split = make_caption_split(spec, "train")
    val = make_caption_split(spec, "val")
    train = caption_training_set(train_split, tokenizer, spec.max_caption_length)
    scoring = train.subset(torch.arange(min(args.importance_pairs, len(train))))
    return {
        "args": args, "teacher": teacher, "tokenizer": tokenizer, "spec": spec, "train": train,
        "val": CaptionSplit(val.images[:args.val_images], val.references[:args.val_images], val.image_ids[:args.val_images]),
        "test": make_caption_split(spec, "test"),
        "importance": score(teacher, scoring.batches(64)),  # once: every arm and seed starts from the same cut
    }


def student_layers(args, teacher) -> int:
    return args.layers or max(1, min(teacher.config.encoder.num_hidden_layers, teacher.config.decoder.num_hidden_layers) // 2)


def initial_student(args, teacher: nn.Module, importance, heads: int, seed: int) -> nn.Module:
    """Every arm's starting point for ``(heads, seed)``: the teacher pruned to its most important ``heads`` of each
    kind per kept layer (``--start pruned``: the same for every seed), or a captioner of exactly those shapes with
    random weights drawn with ``seed`` (``--start random``)."""
    pruned = prune_from_plan(teacher, plan(importance, heads, student_layers(args, teacher), 1.0))
    if args.start == "pruned":
        return pruned
    return VedAdapter.build(copy.deepcopy(pruned.config), seed=seed)


_WORKER: dict = {}


def _init_worker(teacher_dir: str, args) -> None:
    torch.set_num_threads(max(1, args.threads or 1))
    _WORKER.update(_load_world(Path(teacher_dir), args))


def run_group(task: tuple, world: dict | None = None) -> list[dict]:
    """Train one lockstep group ``(stage, heads, seed, ((arm, params), ...))``; one record per student."""
    world = world or _WORKER
    args, teacher, tokenizer, spec = world["args"], world["teacher"], world["tokenizer"], world["spec"]
    stage, heads, seed, members = task
    clock = time.perf_counter()
    start = initial_student(args, teacher, world["importance"], heads, seed)
    origins = recorded_origins(start) if args.start == "pruned" else None
    names_ = [f"{arm}#{index}" for index, (arm, _) in enumerate(members)]
    objectives = {name: objective_for(arm, params, origins) for name, (arm, params) in zip(names_, members)}
    students = {name: copy.deepcopy(start) for name in names_}
    curves: dict[str, list] = {name: [] for name in names_}
    decode = {"max_length": spec.max_caption_length, "batch_size": 128}

    def record_curves(step: int, trained: dict[str, nn.Module]) -> None:
        for name, student in trained.items():
            curves[name].append([step, round(caption_report(student, world["val"], tokenizer, **decode)["cider_d"], 6)])

    trained = train_lockstep(teacher, students, objectives, world["train"], steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             warmup=args.warmup, seed=seed, every=args.eval_every, on_step=record_curves, adapter=VedAdapter)
    records = []
    for name, (arm, params) in zip(names_, members):
        test = caption_report(trained[name], world["test"], tokenizer, **decode)
        records.append({"stage": stage, "arm": arm, "params": params, "heads": heads, "seed": seed, "val_cider_d": curves[name][-1][1],
                        "curve": curves[name], "test": {k: v for k, v in test.items() if k != "examples"}, "examples": test["examples"]})
    seconds = round(time.perf_counter() - clock, 1)
    for record in records:
        record.update(group_seconds=seconds, group_size=len(members))
    return records


def run_groups(groups: list[tuple], world: dict, args, teacher_dir: Path, finished) -> None:
    compare_methods.run_groups(groups, world, args, teacher_dir, finished, worker=run_group, initializer=_init_worker)


def run_key(args, teacher_dir: Path, layers: int) -> str:
    teacher = "random tiny (quick)" if args.quick else file_sha256(teacher_dir / "model.safetensors")
    settings = {"teacher": teacher, "layers": layers, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
                "eval_every": args.eval_every, "val_images": args.val_images, "importance_pairs": args.importance_pairs}
    if args.start != "pruned":  # pruned runs were logged before --start existed: their key stays as it was
        settings["start"] = args.start
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def run_id(arm: str, params: dict, heads: int, seed: int) -> str:
    return json.dumps([arm, params, heads, seed], sort_keys=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = Path(args.out)
    log_path = out.with_name(out.stem + ".runs.jsonl")
    tuning_path = out.with_name(out.stem + ".tuning.json")
    with tempfile.TemporaryDirectory() as scratch:
        teacher_dir = quick_teacher(Path(scratch)) if args.quick else Path(args.teacher)
        if not (teacher_dir / CAPTIONS_FILE).is_file():
            raise SystemExit(f"--teacher {teacher_dir}: not a captioner saved by `amad teacher` with model.family: ved (no {CAPTIONS_FILE})")
        world = _load_world(teacher_dir, args)
        layers = student_layers(args, world["teacher"])
        key = run_key(args, teacher_dir, layers)
        command = ("python benchmarks/compare_captioning.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
        done: dict[str, dict] = {}
        if log_path.is_file() and not args.fresh:
            for line in log_path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("key") == key:
                    done[run_id(record["arm"], record["params"], record["heads"], record["seed"])] = record
        out.parent.mkdir(parents=True, exist_ok=True)
        logged, used = set(done), set()  # runs read back from the log; runs this command needs

        def finished(record: dict) -> None:
            record["key"] = key
            done[run_id(record["arm"], record["params"], record["heads"], record["seed"])] = record
            with log_path.open("a") as log:
                log.write(json.dumps(record) + "\n")
            print(f"{record['stage']:5} {record['arm']:24} {json.dumps(record['params']):48} heads {record['heads']} seed {record['seed']}: "
                  f"test CIDEr-D {record['test']['cider_d']:.3f} BLEU-4 {record['test']['bleu_4']:.3f}", flush=True)

        def pending(members, h, seed):
            used.update(run_id(m[0], m[1], h, seed) for m in members)
            return [m for m in members if run_id(m[0], m[1], h, seed) not in done]

        def grid(arm: str) -> list[dict]:
            return candidates(method_of(arm), args.tune_weights, args.tune_temperatures, args.default_temperature)

        chosen: dict[str, dict[str, dict]] = {}
        if args.tune:
            groups = []
            for h in args.heads:
                todo = pending([(arm, params) for arm in args.methods if arm not in NO_ATTENTION for params in grid(arm)], h, args.tune_seed)
                groups += [("tune", h, args.tune_seed, tuple(chunk)) for chunk in split_evenly(todo, args.jobs) if chunk]
            run_groups(groups, world, args, teacher_dir, finished)
            tuned: dict[str, dict[str, list[dict]]] = {}
            for h in args.heads:
                for arm in args.methods:
                    if arm in NO_ATTENTION:
                        continue
                    runs = [done[run_id(arm, params, h, args.tune_seed)] for params in grid(arm)]
                    tuned.setdefault(str(h), {})[arm] = runs
                    chosen.setdefault(str(h), {})[arm] = max(runs, key=lambda r: r["val_cider_d"])["params"]  # ties: the grid's first
            candidate_runs = [run for per_arm in tuned.values() for runs in per_arm.values() for run in runs]
            tuning_path.write_text(json.dumps({
                "chosen": chosen, "weights": args.tune_weights, "temperatures": args.tune_temperatures, "seed": args.tune_seed, "run_key": key,
                "candidates": {h: {arm: [{"params": r["params"], "val_cider_d": r["val_cider_d"], "curve": r["curve"]} for r in runs]
                                   for arm, runs in per_arm.items()} for h, per_arm in tuned.items()},
                "train_seconds": results_page.run_seconds(candidate_runs),
                "command": command,
            }, indent=2) + "\n")
        elif tuning_path.is_file():  # a later command (more seeds, a resumed one) keeps the tuned settings
            saved = json.loads(tuning_path.read_text())
            chosen = saved["chosen"]
            if saved.get("run_key") != key:
                print(f"note: {tuning_path} was tuned with other settings (run key {saved.get('run_key')} != {key}); using it anyway", flush=True)

        def params_for(arm: str, h: int) -> dict:
            if arm in NO_ATTENTION:
                return {}
            default = {"attention_weight": 1.0, **({"amad_temperature": args.default_temperature} if method_of(arm) == "amad_tuned" else {})}
            return chosen.get(str(h), {}).get(arm, default)

        groups = []
        for seed in args.seeds:
            for h in args.heads:
                todo = pending([(arm, params_for(arm, h)) for arm in args.methods], h, seed)
                groups += [("final", h, seed, tuple(chunk)) for chunk in split_evenly(todo, args.jobs) if chunk]
        run_groups(groups, world, args, teacher_dir, finished)
        teacher_scores = caption_report(world["teacher"], world["test"], world["tokenizer"], max_length=world["spec"].max_caption_length)

    finals = {(arm, h, s): done[run_id(arm, params_for(arm, h), h, s)] for arm in args.methods for h in args.heads for s in args.seeds}

    def per_seed(field: str) -> dict:
        return {arm: {str(h): [finals[(arm, h, s)]["test"][field] for s in args.seeds] for h in args.heads} for arm in args.methods}

    results = {
        "task": "captioning",
        "regime": args.start,
        "cider_d": per_seed("cider_d"),
        "bleu_4": per_seed("bleu_4"),
        "curves": {arm: {str(h): [finals[(arm, h, s)]["curve"] for s in args.seeds] for h in args.heads} for arm in args.methods},
        "params": {arm: {str(h): params_for(arm, h) for h in args.heads} for arm in args.methods},
        "tuning": json.loads(tuning_path.read_text()) if chosen and tuning_path.is_file() else None,
        "teacher": {k: v for k, v in teacher_scores.items() if k != "examples"},
        "seconds": time.perf_counter() - started,
        "train_seconds": results_page.run_seconds(finals.values()),  # each final run's share of its lockstep group's wall time
        "reused_runs": len(used & logged),  # distinct runs taken from the log, not trained by this command
        "config": {"teacher": "random tiny (quick)" if args.quick else str(args.teacher), "start": args.start, "heads": args.heads, "layers": layers, "seeds": args.seeds,
                   "methods": args.methods, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup,
                   "eval_every": args.eval_every, "val_images": args.val_images, "test_images": len(world["test"]), "quick": args.quick,
                   "threads": torch.get_num_threads(), "jobs": args.jobs, "cpu_count": os.cpu_count(), "run_key": key,
                   "torch": torch.__version__, "machine": platform.machine()},
        "command": command,
    }
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"wrote {out}")
    return results


def table(results: dict) -> str:
    """Test CIDEr-D and BLEU-4 per arm and head count (mean over seeds)."""
    heads = [str(h) for h in results["config"]["heads"]]
    lines = ["| arm | " + " | ".join(f"CIDEr-D {h} heads | BLEU-4 {h} heads" for h in heads) + " |",
             "|---" * (1 + 2 * len(heads)) + "|"]
    for arm in results["config"]["methods"]:
        cells = []
        for h in heads:
            cells += [f"{statistics.mean(results['cider_d'][arm][h]):.3f}", f"{100 * statistics.mean(results['bleu_4'][arm][h]):.2f}"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    teacher = results["teacher"]
    lines.append(f"\nteacher: CIDEr-D {teacher['cider_d']:.3f}, BLEU-4 {100 * teacher['bleu_4']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
