"""The ``amad`` command line: parse arguments, load and validate the YAML, call the job's ``main``.

Nothing here does work of its own. Errors a user can fix (a bad config, a missing file) print one
clear message and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config


def _teacher(args: argparse.Namespace) -> int:
    from pipeline import train_teacher
    from pipeline.config import TeacherJobConfig

    cfg = load_config(args.config, TeacherJobConfig)
    metrics = train_teacher.main(cfg, args.workdir, args.output)
    return 1 if math.isnan(metrics["test"]["teacher"]["accuracy"]) else 0


def _distill(args: argparse.Namespace) -> int:
    from pipeline import train_distill
    from pipeline.config import DistillJobConfig, parse_config, with_overrides

    cfg = load_config(args.config, DistillJobConfig)
    overrides = {"run_name": args.name, "scaling.num_workers": args.workers, "scaling.use_gpu": True if args.gpu else None}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if overrides:
        values = with_overrides(cfg.model_dump(mode="json"), overrides)
        cfg = parse_config(values, DistillJobConfig, f"{args.config} with {', '.join(f'{k}={v}' for k, v in overrides.items())}")
    summary = train_distill.main(cfg, args.workdir, address=args.address, tracking_uri=args.tracking_uri)
    return 0 if summary["best_checkpoint"] else 1


def _sweep(args: argparse.Namespace) -> int:
    from pipeline.sweep_config import SweepConfig

    cfg = load_config(args.config, SweepConfig)
    from pipeline import sweep  # imports Ray: only once the config is known to be valid

    summary = sweep.main(cfg, args.workdir, address=args.address, tracking_uri=args.tracking_uri, resume=args.resume)
    if summary["interrupted"]:
        print(f"amad sweep: interrupted; continue with: amad sweep --config {args.config} --workdir {args.workdir} --resume", file=sys.stderr)
        return 130
    return 0 if summary["best"] else 1


def _export(args: argparse.Namespace) -> int:
    from pipeline.config import parse_config, read_yaml, with_overrides
    from pipeline.export_config import ExportJobConfig

    values = read_yaml(args.config)
    overrides = {
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "sweep": args.sweep,
        "teacher": str(args.teacher) if args.teacher else None,
        "name": args.name,
        "registry.student_model": args.register,
        "int8": True if args.int8 else None,
        "force_export": True if args.force_export else None,
        "registry.enabled": False if args.no_register else None,
    }
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if args.checkpoint or args.sweep:  # the command line names the source: drop the YAML's
        values = {k: v for k, v in values.items() if k not in ("checkpoint", "sweep")}
    cfg = parse_config(with_overrides(values, overrides), ExportJobConfig, f"{args.config} with the command line")
    from pipeline import export  # heavy imports (onnx, onnxruntime, mlflow) once the config is valid

    try:
        report = export.main(cfg, args.workdir, tracking_uri=args.tracking_uri)
    except export.GateFailed as failure:
        print(f"amad export: {failure}; nothing was registered", file=sys.stderr)
        return 1
    registered = report.get("registry")
    if registered:
        print(f"amad export: {registered['model']} v{registered['version']} @{registered['alias']} ({registered['reason']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amad",
        description="AMAD distillation pipeline for vision-language transformers.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    teacher = commands.add_parser(
        "teacher",
        help="train a ViLT teacher on the built-in benchmark (with its question-only baselines)",
        description="Train a ViLT teacher on the generated VQA benchmark, train the question-only "
        "baseline, and save a directory that from_pretrained loads (weights, config, tokenizer, metrics).",
    )
    teacher.add_argument("--config", type=Path, default=Path("tune_configs/teacher.yaml"), help="job YAML (default: %(default)s)")
    teacher.add_argument("--workdir", type=Path, default=Path("runs/teacher"), help="where scratch and outputs go (default: %(default)s)")
    teacher.add_argument("--output", type=Path, default=None, help="save the teacher here instead of <workdir>/teacher")
    teacher.set_defaults(handler=_teacher)

    distill = commands.add_parser(
        "distill",
        help="distil a saved teacher into a smaller student with Ray Train (resumable by --name)",
        description="Distil a teacher directory into a student with fewer heads/layers on a Ray cluster "
        "(DDP over Ray Train workers), one validated checkpoint per epoch, tracked in MLflow. Re-running "
        "the same command resumes the run of the same name from its latest checkpoint.",
    )
    distill.add_argument("--config", type=Path, default=Path("tune_configs/distill.yaml"), help="job YAML (default: %(default)s)")
    distill.add_argument("--workdir", type=Path, default=Path("runs/distill"), help="Ray storage (<workdir>/ray/<name>) and the default MLflow store (default: %(default)s)")
    distill.add_argument("--address", default=None, help="join this Ray cluster (default: $RAY_ADDRESS, else start a local one)")
    distill.add_argument("--workers", type=int, default=None, help="override scaling.num_workers")
    distill.add_argument("--gpu", action="store_true", help="one GPU per worker (override scaling.use_gpu)")
    distill.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db)")
    distill.add_argument("--name", default=None, help="override run_name; the same name resumes that run")
    distill.set_defaults(handler=_distill)

    sweep = commands.add_parser(
        "sweep",
        help="Ray Tune search over student shapes and loss weights (ASHA, MLflow, Pareto selection)",
        description="Run a Ray Tune sweep in which every trial is an `amad distill` TorchTrainer run; ASHA "
        "stops poor trials early; the best trial within the budgets goes to <workdir>/sweeps/<name>/best.json.",
    )
    sweep.add_argument("--config", type=Path, default=Path("tune_configs/sweep.yaml"), help="sweep YAML (default: %(default)s)")
    sweep.add_argument("--workdir", type=Path, default=Path("runs/sweep"), help="sweeps go to <workdir>/sweeps/<name>; default MLflow store here (default: %(default)s)")
    sweep.add_argument("--address", default=None, help="join this Ray cluster (default: $RAY_ADDRESS, else start a local one)")
    sweep.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db)")
    sweep.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this name (finished trials are kept)")
    sweep.set_defaults(handler=_sweep)

    export = commands.add_parser(
        "export",
        help="export a student to ONNX, gate it against PyTorch, register it in the MLflow Model Registry",
        description="Export a student checkpoint (or a sweep's chosen one) to ONNX, check it against PyTorch on "
        "validation examples (parity gate; int8: accuracy gate), optionally keep an ONNX Runtime-optimised graph, "
        "and register a new model version. A failing gate exits with status 1 and registers nothing.",
    )
    source = export.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path, default=None, help="a student checkpoint directory (epoch_NNNN)")
    source.add_argument("--sweep", default=None, help="a sweep name: export the checkpoint its best.json names")
    export.add_argument("--config", type=Path, default=Path("tune_configs/export.yaml"), help="export settings YAML (default: %(default)s)")
    export.add_argument("--workdir", type=Path, default=Path("runs/sweep"), help="holds sweeps/<name>/best.json; exports go to <workdir>/exports (default: %(default)s)")
    export.add_argument("--register", default=None, metavar="NAME", help="registered model name (default: the config's, amad-student)")
    export.add_argument("--int8", action="store_true", help="ship a dynamic int8 model, gated on validation accuracy")
    export.add_argument("--teacher", type=Path, default=None, help="the teacher directory (default: the one the training run recorded)")
    export.add_argument("--name", default=None, help="export directory name under <workdir>/exports")
    export.add_argument("--force-export", action="store_true", help="export again even if the same checkpoint was exported before")
    export.add_argument("--no-register", action="store_true", help="export and gate only")
    export.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db)")
    export.set_defaults(handler=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"amad {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"amad {args.command}: interrupted (re-run the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
