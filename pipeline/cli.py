"""The ``amad`` command line: parse arguments, load and validate the YAML, call the job's ``main``.

Nothing here does work of its own. Errors a user can fix (a bad config, a missing file) print one
clear message and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config


def _teacher(args: argparse.Namespace) -> int:
    from pipeline.config import CaptionTeacherJobConfig, parse_config, read_yaml, teacher_job_model

    values = read_yaml(args.config)
    cfg = parse_config(values, teacher_job_model(values), str(args.config))
    if isinstance(cfg, CaptionTeacherJobConfig):  # model.family: ved
        from pipeline import train_captioner

        metrics = train_captioner.main(cfg, args.workdir, args.output)
        return 1 if math.isnan(metrics["test"]["teacher_greedy"]["cider_d"]) else 0
    from pipeline import train_teacher

    metrics = train_teacher.main(cfg, args.workdir, args.output)
    return 1 if math.isnan(metrics["test"]["teacher"]["accuracy"]) else 0


def _distill(args: argparse.Namespace) -> int:
    from pipeline import storage, train_distill
    from pipeline.config import DistillJobConfig, parse_config, with_overrides

    cfg = load_config(args.config, DistillJobConfig)
    overrides = {"run_name": args.name, "scaling.num_workers": args.workers, "scaling.use_gpu": True if args.gpu else None}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if overrides:
        values = with_overrides(cfg.model_dump(mode="json"), overrides)
        cfg = parse_config(values, DistillJobConfig, f"{args.config} with {', '.join(f'{k}={v}' for k, v in overrides.items())}")
    cfg = storage.apply_flag(cfg, args.storage_path, args.config)  # a storage no filesystem opens: exit 2, nothing written
    summary = train_distill.main(cfg, args.workdir, address=args.address, tracking_uri=args.tracking_uri)
    return 0 if summary["best_checkpoint"] else 1


def _sweep(args: argparse.Namespace) -> int:
    from pipeline.sweep_config import SweepConfig

    from pipeline import storage

    cfg = storage.apply_flag(load_config(args.config, SweepConfig), args.storage_path, args.config)
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
        "registry.captioner_model": args.register,  # the checkpoint's family decides which one is used
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


def _run(args: argparse.Namespace) -> int:
    from pipeline.run_config import RunJobConfig

    from pipeline import storage

    cfg = storage.apply_flag(load_config(args.config, RunJobConfig), args.storage_path, args.config)
    from pipeline import run  # imports Ray: only once the config is known to be valid

    run.main(cfg, args.workdir, address=args.address, tracking_uri=args.tracking_uri, serve=args.serve)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from pipeline.tracking import resolve_tracking_uri
    from serving.config import ServeConfig, format_errors, parse_autoscale

    if args.check_config is not None:
        return _check_serve_config(args.check_config)
    try:
        values = {"model": args.model, "tracking_uri": resolve_tracking_uri(args.workdir, args.tracking_uri), "host": args.host,
                  "port": args.port, "replicas": args.replicas, "replica_cpus": args.replica_cpus, "replica_gpus": args.replica_gpus,
                  "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
                  "direct_ingress": not args.no_direct_ingress, "cache_dir": args.cache_dir}
        if args.autoscale:
            values["autoscale"] = parse_autoscale(args.autoscale)
        cfg = ServeConfig.model_validate(values)
    except ValidationError as err:
        raise ConfigError(format_errors(err)) from None
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if args.write_config is not None:
        return _write_serve_config(cfg, args.write_config)
    from serving import server  # imports Ray: only once the config is valid

    try:
        return server.main(cfg, address=args.address, blocking=args.blocking, poll_s=args.poll_s)
    except ValueError as err:  # the model URI is not in the registry
        raise ConfigError(str(err)) from None


def _write_serve_config(cfg, path: Path) -> int:
    """``amad serve --write-config FILE``: resolve the alias, write the Serve config, start nothing."""
    import shlex

    from serving.config import TOKEN_ENV
    from serving.deploy_config import ServeConfigError, serve_config, write_serve_config
    from serving.model import resolve_version

    try:
        _, version, _, _ = resolve_version(cfg.model, cfg.tracking_uri)
    except (ValueError, RuntimeError) as err:  # no such model, alias or version in the registry
        raise ConfigError(str(err)) from None
    token = os.environ.get(TOKEN_ENV) or None
    header = (f"Written by: amad {shlex.join(sys.argv[1:]) if sys.argv[1:] else 'serve --write-config ' + str(path)}\n"
              f"{cfg.model} resolved to version {version}{' (bearer token: only its SHA-256 is here)' if token else ''}.\n"
              f"Deploy: serve deploy {path} --address http://<head>:8265   (or: serve run {path})\n"
              f"Check after editing: amad serve --check-config {path}\n"
              "Set RAY_AUTH_MODE the same way for `ray start` and `serve deploy` (see docs/cluster.md).")
    try:
        write_serve_config(path, serve_config(cfg, version, token), header)
    except (ServeConfigError, OSError) as err:
        raise ConfigError(f"--write-config {path}: {err}") from None
    print(f"amad serve: wrote {path}: {cfg.model} -> version {version}; apply with `serve deploy {path}`", flush=True)
    return 0


def _check_serve_config(path: Path) -> int:
    """``amad serve --check-config FILE``: Ray's schema plus our strict check; exit 0, or 2 naming the key."""
    from serving.deploy_config import ServeConfigError, load_serve_config

    try:
        doc = load_serve_config(path)
    except ServeConfigError as err:
        raise ConfigError(str(err)) from None
    names = ", ".join(app.get("name", "default") for app in doc.get("applications") or [])
    print(f"amad serve: {path} is a valid Serve config (applications: {names or 'none'})", flush=True)
    return 0


def _loadtest(args: argparse.Namespace) -> int:
    import json
    import os

    from serving import loadtest

    if args.concurrency < 1 or args.requests < 1 or args.num_beams < 1:
        raise ConfigError("--concurrency, --requests and --num-beams must be >= 1")
    if not args.url.rstrip("/").endswith(("/v1/answer", "/v1/caption")):
        raise ConfigError(f"--url {args.url}: must end in /v1/answer (a student) or /v1/caption (a captioner)")
    try:
        summary = loadtest.run(args.url.rstrip("/"), args.concurrency, args.requests, args.duration_s,
                               token=os.environ.get("AMAD_SERVE_TOKEN"), num_beams=args.num_beams)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print(f"amad loadtest: {loadtest.format_summary(summary)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0 if not summary["errors_by_status"] else 1


def _data_export_vqa_v2(args: argparse.Namespace) -> int:
    import json

    from amad.data.benchmark import BenchmarkSpec
    from amad.data.vqa_v2 import write_vqa_v2
    from pipeline.config import TeacherJobConfig

    if args.config and args.teacher:
        raise ConfigError("give --config or --teacher, not both")
    if args.teacher:
        spec_file = args.teacher / "benchmark.json"
        if not spec_file.is_file():
            raise ConfigError(f"--teacher {args.teacher}: no benchmark.json (a teacher saved by `amad teacher`)")
        spec, source = BenchmarkSpec.from_dict(json.loads(spec_file.read_text())), f"the data of the teacher {args.teacher}"
    elif args.config:
        spec, source = load_config(args.config, TeacherJobConfig).data.benchmark_spec(), f"the data section of {args.config}"
    else:
        spec, source = BenchmarkSpec(), "the built-in defaults"
    if args.max_scenes is not None and args.max_scenes < 1:
        raise ConfigError("--max-scenes must be >= 1")
    try:
        written = write_vqa_v2(spec, args.out, splits=tuple(args.splits), agreement=args.agreement, max_scenes=args.max_scenes)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print(f"amad data export-vqa-v2: wrote {source} as VQA-v2 files under {args.out}")
    print("data:\n  source: vqa_v2")
    for split, files in written.items():
        counts = files["count"]
        print(f"  {split}: {{questions: {files['questions']}, annotations: {files['annotations']}, images: {files['images']}}}"
              f"  # {counts['questions']} questions, {counts['images']} images")
    return 0


def _dashboards(args: argparse.Namespace) -> int:
    from pipeline.dashboards import write

    try:
        written = write(args.out)
    except OSError as err:
        raise ConfigError(f"cannot write the dashboards to {args.out}: {err.strerror or err}") from None
    for path in written:
        print(f"amad dashboards: wrote {path}")
    print("import them into Grafana with a Prometheus datasource that scrapes every Ray node's metrics port (docs/observability.md)")
    return 0


def _checkpoint_to_hf(args: argparse.Namespace) -> int:
    from amad.hf_checkpoint import teacher_to_hf_checkpoint

    try:
        check = teacher_to_hf_checkpoint(args.teacher, args.out)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    print(f"amad checkpoint to-hf: wrote {args.teacher} as a Hugging Face ViLT VQA checkpoint at {args.out} ({check['answers']} answers); "
          f"stock ViltForQuestionAnswering + ViltProcessor reproduce it on {check['questions']} validation questions "
          f"(same tokens, max |logit diff| {check['max_abs_logit_diff']:.1e})")
    print(f"use it as a job's teacher with VQA-v2 files: teacher: {args.out}  (amad data export-vqa-v2 --teacher {args.teacher} --out DIR writes its data)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amad",
        description="AMAD distillation pipeline for vision-language transformers.",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    teacher = commands.add_parser(
        "teacher",
        help="train a teacher on the built-in benchmark: ViLT for VQA, or a captioner (model.family: ved), with its blind baselines",
        description="Train a ViLT teacher on the generated VQA benchmark (or, with model.family: ved, a ViT+BERT captioner on "
        "its captions), train the baseline that cannot see the image (question-only / text-only), and save a directory that "
        "from_pretrained loads (weights, config, tokenizer, metrics).",
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
    distill.add_argument("--storage-path", default=None, metavar="PATH_OR_URI",
                         help="where Ray Train writes checkpoints (<storage>/ray/<name>): a directory or a pyarrow.fs URI every node "
                              "sees (s3://bucket/prefix, gs://bucket/prefix, file:///nfs/amad); overrides storage.path (default: --workdir)")
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
    sweep.add_argument("--storage-path", default=None, metavar="PATH_OR_URI",
                       help="where Tune and the trials write results and checkpoints (<storage>/sweeps/<name>): a directory or a "
                            "pyarrow.fs URI every node sees (s3://..., gs://..., file:///nfs/...); overrides storage.path (default: --workdir)")
    sweep.set_defaults(handler=_sweep)

    export = commands.add_parser(
        "export",
        help="export a student to ONNX, gate it against PyTorch, register it in the MLflow Model Registry",
        description="Export a student checkpoint (or a sweep's chosen one) to ONNX, check it against PyTorch on "
        "validation examples (parity gate; int8: accuracy gate), optionally keep an ONNX Runtime-optimised graph, "
        "and register a new model version. A failing gate exits with status 1 and registers nothing.",
    )
    source = export.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", default=None, help="a student checkpoint directory (epoch_NNNN): a path or a storage URI (s3://, gs://, file://)")
    source.add_argument("--sweep", default=None, help="a sweep name: export the checkpoint its best.json names")
    export.add_argument("--config", type=Path, default=Path("tune_configs/export.yaml"), help="export settings YAML (default: %(default)s)")
    export.add_argument("--workdir", type=Path, default=Path("runs/sweep"), help="holds sweeps/<name>/best.json; exports go to <workdir>/exports (default: %(default)s)")
    export.add_argument("--register", default=None, metavar="NAME", help="registered model name (default: the config's, amad-student; amad-captioner for a captioner)")
    export.add_argument("--int8", action="store_true", help="ship a dynamic int8 model, gated on validation accuracy")
    export.add_argument("--teacher", type=Path, default=None, help="the teacher directory (default: the one the training run recorded)")
    export.add_argument("--name", default=None, help="export directory name under <workdir>/exports")
    export.add_argument("--force-export", action="store_true", help="export again even if the same checkpoint was exported before")
    export.add_argument("--no-register", action="store_true", help="export and gate only")
    export.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db)")
    export.set_defaults(handler=_export)

    run = commands.add_parser(
        "run",
        help="the whole pipeline: teacher, sweep, selection, ONNX export and gates, registry, Serve smoke test, report",
        description="Run every stage on the config's settings; a finished stage is reused when its inputs have not changed, "
        "and an interrupted run resumes at the stage it stopped in. A captioning teacher (model.family: ved) makes it a "
        "captioning run (tune_configs/captioning.yaml): amad-captioner, /v1/caption, a CIDEr-D report.",
    )
    run.add_argument("--config", type=Path, default=Path("tune_configs/default.yaml"), help="pipeline YAML (default: %(default)s)")
    run.add_argument("--workdir", type=Path, default=Path("runs/demo"), help="everything the run writes, and the default MLflow store (default: %(default)s)")
    run.add_argument("--address", default=None, help="join this Ray cluster (default: $RAY_ADDRESS, else start a local one)")
    run.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db)")
    run.add_argument("--serve", action="store_true", help="leave Serve running on the champion after the smoke test and print its URL")
    run.add_argument("--storage-path", default=None, metavar="PATH_OR_URI",
                     help="where the sweep's trials write checkpoints (<storage>/sweeps/<sweep>): a directory or a pyarrow.fs URI every "
                          "node sees (s3://..., gs://..., file:///nfs/...); overrides storage.path (default: the sweep YAML's, else --workdir)")
    run.set_defaults(handler=_run)

    serve_cmd = commands.add_parser(
        "serve",
        help="serve a registered student over HTTP with Ray Serve (dynamic batching, validation)",
        description="Serve models:/<name>@<alias> from the MLflow Model Registry with Ray Serve: POST /v1/answer, "
        "GET /healthz, GET /v1/model, docs at /docs. Set AMAD_SERVE_TOKEN to require a bearer token.",
    )
    serve_cmd.add_argument("--model", default="models:/amad-student@champion", help="registry URI (default: %(default)s)")
    serve_cmd.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve_cmd.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    scale = serve_cmd.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, help="fixed number of replicas (default: %(default)s)")
    scale.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="Serve autoscaling between MIN and MAX replicas")
    serve_cmd.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica; ONNX Runtime threads = whole CPUs (default: %(default)s)")
    serve_cmd.add_argument("--replica-gpus", type=float, default=0.0,
                           help="GPUs per replica; > 0 runs ONNX Runtime's CUDA provider (default: %(default)s)")
    serve_cmd.add_argument("--max-batch-size", type=int, default=16, help="dynamic batching: largest batch (default: %(default)s)")
    serve_cmd.add_argument("--batch-wait-ms", type=float, default=5.0, help="dynamic batching: longest wait for a batch to fill (default: %(default)s)")
    serve_cmd.add_argument("--no-direct-ingress", action="store_true",
                           help="only Serve's proxy answers (by default replicas of a local cluster also answer HTTP directly: lower latency)")
    serve_cmd.add_argument("--blocking", action="store_true", help="serve until Ctrl-C, following the alias (always so without --address)")
    serve_cmd.add_argument("--poll-s", type=float, default=30.0, help="how often --blocking re-reads the alias (default: %(default)s)")
    serve_cmd.add_argument("--address", default=None, help="deploy onto this Ray cluster (default: $RAY_ADDRESS, else a local one)")
    serve_cmd.add_argument("--cache-dir", default=None,
                           help="where replicas download a model version before loading it; each load gets its own directory, "
                                "deleted once the model is in memory (default: $AMAD_SERVE_CACHE, else the system temp dir)")
    serve_cmd.add_argument("--workdir", type=Path, default=Path("runs/sweep"), help="where the default MLflow store is (default: %(default)s)")
    serve_cmd.add_argument("--tracking-uri", default=None, help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db)")
    config_io = serve_cmd.add_mutually_exclusive_group()
    config_io.add_argument("--write-config", type=Path, default=None, metavar="FILE",
                           help="write a Serve config for `serve deploy FILE` / `serve run FILE` / a RayService's serveConfigV2, "
                                "with --model resolved to its current version, and exit (nothing starts); re-run it after the "
                                "alias moves and `serve deploy` swaps the model in place")
    config_io.add_argument("--check-config", type=Path, default=None, metavar="FILE",
                           help="check a Serve config strictly (unknown keys, bad values, named by key) and exit: 0 when valid, 2 when not")
    serve_cmd.set_defaults(handler=_serve)

    load = commands.add_parser(
        "loadtest",
        help="send real test-split questions to amad serve at a fixed concurrency; latency percentiles and errors",
        description="Bounded load (count and time) against the given URL only: p50/p95/p99 latency, throughput, errors by status.",
    )
    load.add_argument("--url", default="http://127.0.0.1:8000/v1/answer",
                      help="the route to drive: .../v1/answer (questions) or .../v1/caption (images) (default: %(default)s)")
    load.add_argument("--num-beams", type=int, default=1, help="/v1/caption only: beam width of every request (default: %(default)s)")
    load.add_argument("--concurrency", type=int, default=8, help="requests in flight (default: %(default)s)")
    load.add_argument("--requests", type=int, default=500, help="total requests at most (default: %(default)s)")
    load.add_argument("--duration-s", type=float, default=None, help="stop after this many seconds even if requests remain")
    load.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    load.set_defaults(handler=_loadtest)

    data = commands.add_parser("data", help="data-set tools (write the built-in benchmark as VQA-v2 files)")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    export_vqa = data_commands.add_parser(
        "export-vqa-v2",
        help="write the generated benchmark as VQA-v2 files (questions/annotations JSON, COCO-named JPEGs)",
        description="Write the built-in generated benchmark in the VQA-v2 download's format: per split a questions JSON, an "
        "annotations JSON with 10 human answers per question, and COCO-named JPEGs, so the real-format path (data.source: "
        "vqa_v2) runs on data with a known answer. Prints the data: section to put in a job YAML.",
    )
    export_vqa.add_argument("--out", type=Path, required=True, help="directory to write into")
    export_vqa.add_argument("--config", type=Path, default=None, help="a teacher YAML whose data section to write (default: the built-in defaults)")
    export_vqa.add_argument("--teacher", type=Path, default=None, help="write the data a teacher directory was trained on (its benchmark.json)")
    export_vqa.add_argument("--splits", nargs="+", default=["train", "val", "test"], choices=["train", "val", "test"])
    export_vqa.add_argument("--max-scenes", type=int, default=None, help="at most this many scenes (images) per split: the first ones")
    export_vqa.add_argument("--agreement", type=int, default=8, help="how many of the 10 humans give the true answer (default: %(default)s)")
    export_vqa.set_defaults(handler=_data_export_vqa_v2)

    dashboards = commands.add_parser(
        "dashboards", help="write Grafana dashboards: Ray's (Serve, Serve deployments, Train, cluster) and the answer service's metrics",
        description="Writes Ray's own Grafana dashboards, from the pinned Ray's dashboard factory, and one for the answer service's "
                    "metrics (serving/metrics.py). deploy/observability/ holds this command's output.")
    dashboards.add_argument("--out", type=Path, default=Path("deploy/observability"), help="directory to write (default: %(default)s)")
    dashboards.set_defaults(handler=_dashboards)

    checkpoint = commands.add_parser("checkpoint", help="checkpoint tools (write a teacher as a Hugging Face ViLT checkpoint)")
    checkpoint_commands = checkpoint.add_subparsers(dest="checkpoint_command", required=True, metavar="CHECKPOINT_COMMAND")
    to_hf = checkpoint_commands.add_parser(
        "to-hf",
        help="write a teacher saved by `amad teacher` as a stock Hugging Face ViLT VQA checkpoint",
        description="Write a teacher saved by `amad teacher` in the layout ViltForQuestionAnswering.save_pretrained and "
        "ViltProcessor.save_pretrained write (config, safetensors, BERT tokenizer with the teacher's vocabulary, ViLT image "
        "processor), checked before it is kept: the stock classes must reproduce the teacher's tokens and logits. The "
        "result enters every job as a user's own checkpoint would (teacher: DIR with data.source: vqa_v2).",
    )
    to_hf.add_argument("--teacher", type=Path, default=Path("weights/teacher-default"), help="teacher directory (default: %(default)s)")
    to_hf.add_argument("--out", type=Path, required=True, help="new directory to write (must not exist)")
    to_hf.set_defaults(handler=_checkpoint_to_hf)
    return parser


EXIT_STATUS_HELP = """\
exit status:
  0    done; amad serve (and amad run --serve once it serves) also when stopped by Ctrl-C or SIGTERM
  1    the job ran and failed (a failing export gate, no checkpoint, failed requests of amad loadtest)
  2    a bad config or argument: nothing was started
  130  stopped by Ctrl-C: what finished is saved; run the same command again to resume (sweep: --resume)
  143  stopped by SIGTERM (Kubernetes, systemd, docker stop), handled as Ctrl-C

SIGTERM or Ctrl-C: no new work is taken, Serve finishes the requests in flight, the Ray cluster the
command started is shut down with every process it ran. Send SIGTERM to the amad process only
(systemd: KillMode=mixed). Details: docs/operations.md"""

# Ray Train gives a worker group 60 s to start by default. On a small machine under load (a sweep's
# trials start their workers while others train), importing torch in a new worker can take longer,
# and the trial then retries the start-up forever. A local cluster started by this command inherits this.
WORKER_START_TIMEOUT = ("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (``EXIT_STATUS_HELP``, which ``amad --help`` prints)."""
    from pipeline.stopping import INTERRUPTED, TERMINATED, sigterm_stops

    args = build_parser().parse_args(argv)
    os.environ.setdefault(*WORKER_START_TIMEOUT)
    # SIGTERM (Kubernetes, systemd, docker stop) stops every command as Ctrl-C does: see pipeline/stopping.py.
    with sigterm_stops(f"amad {args.command}") as stop:
        try:
            code = args.handler(args)
        except (ConfigError, FileNotFoundError) as err:
            print(f"amad {args.command}: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            code, why = INTERRUPTED, "interrupted"
        except BaseException as err:
            if not stop.requested:
                raise
            # the job's own way of stopping ended in an exception (Ray Train's abort ends in SystemExit)
            code, why = INTERRUPTED, "interrupted" if isinstance(err, SystemExit) else f"interrupted ({type(err).__name__} while stopping)"
        else:
            if not stop.requested or code == 0:  # 0: done, or (amad serve) stopped as asked
                return code
            print(f"amad {args.command}: stopped by SIGTERM", file=sys.stderr)  # the job said how to resume
            return TERMINATED
        if stop.requested:
            code, why = TERMINATED, why.replace("interrupted", "stopped by SIGTERM", 1)
        print(f"amad {args.command}: {why} (re-run the same command to resume)", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
