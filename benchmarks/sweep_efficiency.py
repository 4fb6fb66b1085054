"""Sweep efficiency of ``amad sweep``: the same 8-trial space with ASHA early stopping and without.

Run from the repository root (``--quick``: tiny shapes, a random teacher and one round after the
warm-up, 4 min 19 s on 2 cores on 2026-12-04; the default uses the committed teacher and three rounds,
about 65 minutes):

    .venv/bin/python benchmarks/sweep_efficiency.py --quick
    .venv/bin/python benchmarks/sweep_efficiency.py

**Set-up.** A two-node local ``ray.cluster_utils.Cluster`` (1 CPU and an 80 MB object store per node)
bound to 127.0.0.1 with the loopback environment of :mod:`pipeline.local_cluster`, under a private
temporary directory, shut down at the end. Both sweeps are real ``pipeline.sweep.main`` runs --
Tune trials that each fit a TorchTrainer, MLflow in a throw-away SQLite store -- over the same grid
(``student.heads`` x ``objective.attention_weight`` x ``objective.amad_temperature``, 2 x 2 x 2 = 8
trials), ``max_concurrent_trials: 2``, the same seeds, so a trial trains identically in both sweeps
until ASHA stops it. One sweep uses ASHA (grace period 1 epoch, ``--reduction-factor`` 3, ``--epochs`` 27
max; ``--quick``: 2 and 4), the other FIFO (every trial runs all epochs). ``--quick`` uses the shape of
``tune_configs/tiny/teacher.yaml`` with random weights (accuracy figures then only compare the two
sweeps with each other); the default uses ``weights/teacher-default``.

**Measurement.** ``wall_s_*``: wall-clock seconds of ``sweep.main`` (Tune, every trial's start-up,
training, validation and checkpoints, then selection with latency measurement). ``best_acc_*``: the
selected trial's best-epoch validation accuracy. Target (reported, not enforced): ASHA's wall time
at most 0.6 x the full sweep's, with a best accuracy within 1 point.

**Warm-up.** Before timing, one untimed sweep of two 1-epoch trials on the same cluster. In a run
without it (2026-12-04) the fresh cluster's first sweep (ASHA) took 503 s, its trials 37 s to their
first report where every later sweep's took 27-32 s; with it the same sweep took 430 s. That cost fell
on whichever scheduler ran first. Its cause was not pinned down.

**Rounds.** This machine is shared, and one sweep pair run back to back once measured the same trials at
8.0 s per epoch in the first sweep and 6.2 s in the second, which alone moved the ratio by ~0.1. So
``--rounds`` (default 3; ``--quick``: 1) runs the pairs interleaved ABBA (ASHA, full, full, ASHA, ...):
a drift in the machine's speed over the run then weighs on both sweeps alike. The headline
``wall_s_*`` are each sweep's median over rounds, the ratio is of those medians, and every round's own
ratio is kept; the accuracy target must hold in every round. The load average before each sweep and
after the last is recorded.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
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

TARGET_RATIO, TARGET_ACC_POINTS = 0.6, 1.0
TARGET = f"wall_s_asha <= {TARGET_RATIO} x wall_s_full and best_acc_asha >= best_acc_full - {TARGET_ACC_POINTS} point"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "sweep_efficiency.json"
SPACE = {  # 8 trials
    "student.heads": {"grid": [2, 4]},
    "objective.attention_weight": {"grid": [0.5, 5.0]},
    "objective.amad_temperature": {"grid": [1.0, 0.3]},
}
# (normal, --quick) defaults for flags left unset
# Many short epochs and a reduction factor of 3 (rungs at 1, 3, 9 and 27 epochs) let ASHA stop trials
# where it saves most; a trial's start-up (worker group, teacher load, data) is paid in full either
# way. With 9 epochs max (two rungs, 400 scenes) ASHA's sweep took 0.75x the full one: ASHA cannot save
# more than the epochs it skips, and with two rungs those were 30 of 72.
DEFAULTS = {"epochs": (27, 4), "train_scenes": (200, 200), "val_scenes": (100, 20), "workers": (2, 1),
            "reduction_factor": (3, 2), "rounds": (3, 1)}
SCHEDULERS = ("asha", "fifo")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, random teacher: a smoke run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help="max epochs per trial (ASHA's max_t)")
    parser.add_argument("--train-scenes", type=int, default=None, help="train scenes (x questions per scene)")
    parser.add_argument("--val-scenes", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="Ray Train workers per trial")
    parser.add_argument("--reduction-factor", type=int, default=None, help="ASHA's reduction factor (grace period: 1 epoch)")
    parser.add_argument("--rounds", type=int, default=None, help="ASHA/full pairs, run interleaved ABBA; medians reported")
    args = parser.parse_args(argv)
    for name, values in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, values[args.quick])
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    return args


def sweep_order(rounds: int) -> list[tuple[int, str]]:
    """(round, scheduler) in the order they run: ABBA, so round r runs ASHA first when r is even."""
    return [(r, s) for r in range(rounds) for s in (SCHEDULERS if r % 2 == 0 else SCHEDULERS[::-1])]


def sweep_config(args, teacher: Path, scheduler: str, warm_up: bool = False):
    from pipeline.config import parse_config
    from pipeline.sweep_config import SweepConfig

    preset = ROOT / "tune_configs" / ("tiny" if args.quick else "") / "sweep.yaml"
    values = copy.deepcopy(yaml.safe_load(preset.read_text()))
    values.update(name=f"efficiency-{scheduler}", space=SPACE, max_concurrent_trials=2, time_budget_s=None)
    values["search"] = {"algorithm": "random", "num_samples": 1, "seed": 0}
    values["scheduler"] = {"type": scheduler, "grace_period": 1, "reduction_factor": args.reduction_factor, "max_epochs": args.epochs}
    if warm_up:  # one pair of 1-epoch trials: every process and file a trial uses, started once before timing
        values.update(name="efficiency-warm-up", space={"student.heads": {"grid": [2, 4]}})
        values["scheduler"] = {"type": "fifo", "max_epochs": 1}
    job = values["job"]
    job["teacher"] = str(teacher)
    job["data"] = {"train_scenes": args.train_scenes, "val_scenes": args.val_scenes}
    job["student"] = {"heads": 2, "layers": 1} if args.quick else {"heads": 4, "layers": 2, "head_dim": 16}
    job["scaling"] = {"num_workers": args.workers, "cpus_per_worker": 1 / args.workers, "use_gpu": False, "threads_per_worker": 1}
    job["train"] = {**job["train"], "warmup_steps": min(job["train"].get("warmup_steps", 0), 50)}  # epochs are short here
    job.update(checkpoints_to_keep=1, max_failures=0)
    return parse_config(values, SweepConfig, f"{preset} (benchmark, {scheduler})")


def main(argv=None) -> dict:
    args = parse_args(argv)
    from pipeline import names, sweep

    load_before = os.getloadavg()
    rounds: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="amad-sweep-eff-") as scratch:
        scratch = Path(scratch)
        if args.quick:
            from train_scaling import save_random_teacher

            save_random_teacher(ROOT / "tune_configs" / "tiny" / "teacher.yaml", scratch / "teacher")
            teacher = scratch / "teacher"
        else:
            teacher = ROOT / "weights" / "teacher-default"
        with local_cluster(nodes=2, num_cpus=1):
            # Untimed: a fresh cluster's first sweep ran ~70 s slower than the same sweep later (see Warm-up).
            tick = time.perf_counter()
            sweep.main(sweep_config(args, teacher, "fifo", warm_up=True), scratch / "warm-up",
                       tracking_uri=f"sqlite:///{scratch / 'warm-up' / 'mlflow.db'}")
            warm_up_s = time.perf_counter() - tick
            for round_index, scheduler in sweep_order(args.rounds):
                cfg = sweep_config(args, teacher, scheduler)
                print(f"--- round {round_index + 1}/{args.rounds}, {scheduler}: 8 trials, {args.epochs} epochs max, "
                      f"{args.workers} worker(s) per trial, 2 at a time", flush=True)
                workdir = scratch / f"{scheduler}-{round_index}"
                load = os.getloadavg()
                tick = time.perf_counter()
                summary = sweep.main(cfg, workdir, tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
                wall = time.perf_counter() - tick
                rows = summary["rows"]
                rounds.setdefault(round_index, {})[scheduler] = {
                    "wall_s": wall,
                    "best_acc": summary["best"]["metrics"][names.VAL_ACCURACY],
                    "best_trial": summary["best"]["params"],
                    "counts": summary["counts"],
                    "epochs_trained": sum(r["epochs"] for r in rows),
                    "trial_timing": trial_timing(workdir / "sweeps" / cfg.name),
                    "load_average_before": [round(x, 2) for x in load],
                    "trials": sorted(
                        [{**r["config"], "status": r["status"], "epochs": r["epochs"], names.VAL_ACCURACY: r.get(names.VAL_ACCURACY)} for r in rows],
                        key=lambda r: sorted(r.items()).__repr__(),
                    ),
                }
    load_after = os.getloadavg()

    results = summarise([rounds[r] for r in sorted(rounds)])
    results["config"] = {
        "quick": args.quick,
        "space": SPACE,
        "trials": 8,
        "max_concurrent_trials": 2,
        "epochs": args.epochs,
        "asha": {"grace_period": 1, "reduction_factor": args.reduction_factor},
        "train_scenes": args.train_scenes,
        "val_scenes": args.val_scenes,
        "workers_per_trial": args.workers,
        "rounds": args.rounds,
        "warm_up_s": round(warm_up_s, 1),
        "order": [f"{scheduler}-{r + 1}" for r, scheduler in sweep_order(args.rounds)],
        "nodes": 2,
        "cpus_per_node": 1,
        "teacher": "random, tune_configs/tiny/teacher.yaml shape" if args.quick else "weights/teacher-default",
        **run_facts(load_before, load_after),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"wrote {args.out}")
    return results


def summarise(rounds: list[dict]) -> dict:
    """The headline figures from each round's ``{"asha": run, "fifo": run}``: each sweep's median wall
    time and best accuracy over rounds, the ratio of the median wall times, and each round's own ratio
    and accuracy gap (in points, full minus ASHA). The target needs the ratio of medians at most
    TARGET_RATIO and every round's gap at most TARGET_ACC_POINTS."""
    median = statistics.median
    wall_asha, wall_full = median(r["asha"]["wall_s"] for r in rounds), median(r["fifo"]["wall_s"] for r in rounds)
    per_round = [{"wall_ratio": r["asha"]["wall_s"] / r["fifo"]["wall_s"],
                  "acc_gap_points": 100 * (r["fifo"]["best_acc"] - r["asha"]["best_acc"])} for r in rounds]
    ratio = wall_asha / wall_full
    worst_gap = max(r["acc_gap_points"] for r in per_round)
    return {
        "wall_s_asha": wall_asha,
        "wall_s_full": wall_full,
        "best_acc_asha": median(r["asha"]["best_acc"] for r in rounds),
        "best_acc_full": median(r["fifo"]["best_acc"] for r in rounds),
        "wall_ratio": ratio,
        "acc_gap_points": worst_gap,
        "per_round": per_round,
        "target": TARGET,
        "meets_target": bool(ratio <= TARGET_RATIO and worst_gap <= TARGET_ACC_POINTS),
        "rounds": rounds,
    }


def trial_timing(sweep_dir: Path) -> dict:
    """Where a trial's time goes, from Tune's saved results: ``time_total_s`` (seconds since the trial
    function started) at each epoch report. ``first_report_s``: start-up (worker group, data, teacher)
    plus the first epoch; ``epoch_s``: the interval between later reports (one epoch's training,
    validation and checkpoint). Medians over trials; under ASHA a stopped trial's teardown is not seen."""
    from ray.tune import ExperimentAnalysis

    from pipeline import names
    from pipeline.sweep import TUNE_DIR

    analysis = ExperimentAnalysis(str(sweep_dir / TUNE_DIR))
    first, intervals, totals = [], [], []
    for frame in analysis.trial_dataframes.values():
        if frame is None or frame.empty or "time_total_s" not in frame:
            continue
        times = [float(t) for t in frame.sort_values(names.EPOCH)["time_total_s"]]
        first.append(times[0])
        intervals += [b - a for a, b in zip(times, times[1:])]
        totals.append(times[-1])
    median = lambda values: round(statistics.median(values), 2) if values else None  # noqa: E731
    return {"first_report_s": median(first), "epoch_s": median(intervals), "trial_s_sum": round(sum(totals), 1)}


def print_table(results: dict) -> None:
    print(f"\n{'round':>5} | {'sweep':>6} | {'wall s':>7} | {'epochs trained':>14} | {'stopped early':>13} | {'best val acc':>12} | "
          f"{'trial start + 1st epoch s':>25} | {'later epochs s':>14} | {'load before':>11}")
    for index, runs in enumerate(results["rounds"]):
        for label, key in (("ASHA", "asha"), ("full", "fifo")):
            run = runs[key]
            timing = run.get("trial_timing") or {}
            print(f"{index + 1:>5} | {label:>6} | {run['wall_s']:7.1f} | {run['epochs_trained']:14d} | {run['counts']['stopped_early']:13d} | "
                  f"{run['best_acc']:12.4f} | {timing.get('first_report_s')!s:>25} | {timing.get('epoch_s')!s:>14} | "
                  f"{run['load_average_before'][0]:11.2f}")
    rounds = ", ".join(f"{r['wall_ratio']:.2f}" for r in results["per_round"])
    print(f"ASHA / full wall time (medians over {len(results['rounds'])} round(s)): {results['wall_s_asha']:.1f} / "
          f"{results['wall_s_full']:.1f} s = {results['wall_ratio']:.2f} (per round: {rounds}); worst accuracy gap "
          f"{results['acc_gap_points']:.1f} points (target {results['target']}: {'met' if results['meets_target'] else 'NOT met'}); "
          f"load average before {results['config']['load_average_before']}, after {results['config']['load_average_after']}")


if __name__ == "__main__":
    main()
