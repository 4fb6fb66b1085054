"""The ``amad`` command line: parse arguments, load and validate the YAML, call the job's ``main``.

Nothing here does work of its own. Errors a user can fix (a bad config, a missing file) print one
clear message and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config


def _teacher(args: argparse.Namespace) -> int:
    from pipeline import train_teacher
    from pipeline.config import TeacherJobConfig

    cfg = load_config(args.config, TeacherJobConfig)
    metrics = train_teacher.main(cfg, args.workdir, args.output)
    return 0 if metrics["test"]["teacher"]["accuracy"] == metrics["test"]["teacher"]["accuracy"] else 1  # NaN -> 1


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
