"""``amad export``: a trained student -> ONNX, verified against PyTorch, registered in MLflow.

Steps (each gate stops the job with :class:`GateFailed`, a non-zero exit and the figures; nothing
is registered and no alias moves):

1. The checkpoint: ``checkpoint`` directly, or the one a sweep chose (``<workdir>/sweeps/<name>/best.json``):
   a local directory, or a location in the job's storage (any ``pyarrow.fs`` URI, :mod:`pipeline.storage`),
   copied once to ``<workdir>/checkpoint_cache``.
2. Export to ``<workdir>/exports/<name>/student.onnx`` (dynamic batch and text length,
   ``onnx.checker``). A file already exported from the same checkpoint bytes with the same exporter
   and opset is reused (``force_export`` re-exports); the gate below checks it either way.
3. Parity gate on the first ``gates.parity_examples`` validation examples: max |logit difference|
   and top-1 agreement between PyTorch and ONNX Runtime.
4. Graph optimisation (:func:`pipeline.onnx_tools.optimize_graph`), kept only if it passes the same gate.
5. ``int8``: dynamic quantisation, kept only if its validation accuracy is within
   ``gates.int8_max_accuracy_drop`` of fp32; a failure fails the job (int8 was asked for).
6. ``report.json`` in the export directory; then (``registry.enabled``) the teacher is registered if its
   weights are not yet, the shipped file is logged to an ``amad-export`` MLflow run and registered
   as a new version of ``registry.student_model`` with its figures as tags, and the alias moved.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from amad.data.dataset import VQASplit
from amad.data.preprocess import PROCESSOR_FILES, is_checkpoint_processor, load_preprocessor
from amad.data.sources import DataSource, source_from_dict, split_for_model
from amad.data.text import TOKENIZER_FILE
from amad.models import ViltAdapter, shape_summary
from pipeline import names, onnx_tools, storage
from pipeline.config import ConfigError
from pipeline.export_config import ExportJobConfig
from pipeline.registry import TAG_VAL_ACCURACY, TAG_WEIGHTS_SHA, Registry, file_sha256, onnx_signature
from pipeline.tracking import DEFAULT_ARTIFACTS, resolve_tracking_uri

MODEL_FILES = ("config.json", "model.safetensors")  # and the pre-processing's files, and (a student) benchmark.json
MANIFEST = "manifest.json"
REPORT = "report.json"
SWEEP_BEST = "best.json"
EVAL_BATCH = 256


class GateFailed(RuntimeError):
    """A candidate failed a gate; the message holds the figures."""


def _log(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------ what to export


@dataclass(frozen=True)
class Source:
    checkpoint: Path  # a local directory with the checkpoint's files (a copy, for a checkpoint in URI storage)
    location: str  # where the checkpoint is: a local path or a URI in the training job's storage
    sweep: dict | None  # best.json of the sweep, when the checkpoint came from one
    records: tuple[str, ...] = ()  # more directories that may hold the run's job.json / mlflow_run.json

    @property
    def run_dir(self) -> str:
        """The Ray Train run (or sweep trial) directory holding the checkpoint: a path or a URI."""
        return storage.parent(self.location)

    @property
    def run_dirs(self) -> tuple[str, ...]:
        """Where the training run's records may be: its directory in the storage, then the others."""
        return (self.run_dir, *(d for d in self.records if d != self.run_dir))


def run_record(source: Source, filename: str) -> dict | None:
    """The first readable ``filename`` (JSON) among the source's run directories, or None."""
    for directory in source.run_dirs:
        text = storage.read_text_or_none(storage.join(directory, filename))
        if text is not None:
            try:
                return json.loads(text)
            except ValueError:
                continue
    return None


CAPTIONER_FILE = "captions.json"  # beside a captioner (pipeline.train_captioner.CAPTIONS_FILE)


def check_model_dir(path: Path, what: str, *, needs_data: bool = True, captioner_ok: bool = False) -> Path:
    """A saved model directory: weights, config, pre-processing files (our ``tokenizer.json`` or a
    checkpoint's processor) and, with ``needs_data`` (a student checkpoint), the ``benchmark.json``
    naming the data it was trained on. ConfigError naming what is missing."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"{what}: {path} is not a directory")
    if (path / CAPTIONER_FILE).is_file():
        if captioner_ok:  # amad export takes captioner checkpoints (pipeline.export_captioner)
            missing = [name for name in (*MODEL_FILES, TOKENIZER_FILE) if not (path / name).is_file()]
            if missing:
                raise ConfigError(f"{what}: {path} is not a captioner saved by amad (missing {', '.join(missing)})")
            return path
        raise ConfigError(f"{what}: {path} is a captioner (model.family: ved); this needs a VQA model (ViLT)")
    missing = [name for name in MODEL_FILES if not (path / name).is_file()]
    if not (path / TOKENIZER_FILE).is_file() and not is_checkpoint_processor(path):
        missing.append(f"{TOKENIZER_FILE} or {' / '.join(PROCESSOR_FILES)}")
    if needs_data and not (path / names.BENCHMARK_FILE).is_file():
        missing.append(names.BENCHMARK_FILE)
    if missing:
        raise ConfigError(f"{what}: {path} is not a model saved by amad (missing {', '.join(missing)})")
    return path


def resolve_source(cfg: ExportJobConfig, workdir: Path) -> Source:
    """The checkpoint to export; ConfigError naming the problem if there is none. A checkpoint given by
    a URI is read through the filesystem that opens it (copied once under ``<workdir>``)."""
    sweep, records = None, ()
    if cfg.checkpoint is None and cfg.sweep is None:
        raise ConfigError("nothing to export: give a checkpoint (--checkpoint DIR) or a sweep (--sweep NAME)")
    if cfg.sweep is not None:
        best_file = workdir / "sweeps" / cfg.sweep / SWEEP_BEST
        if not best_file.is_file():
            raise ConfigError(f"sweep: no {best_file} (has `amad sweep` finished with --workdir {workdir}?)")
        sweep = json.loads(best_file.read_text())
        chosen = sweep.get("best") or {}
        if not chosen.get("checkpoint"):
            reason = sweep.get("reason") or ("the sweep was interrupted: finish it with --resume" if sweep.get("interrupted") else "no trial was chosen")
            raise ConfigError(f"sweep: {best_file} names no checkpoint ({reason})")
        location, what = chosen["checkpoint"], f"sweep {cfg.sweep}'s checkpoint"
        # the trial's child MLflow record stays with the driver when the storage is elsewhere
        records = (str(workdir / "sweeps" / cfg.sweep / "trials" / str(chosen.get("trial_id"))),)
    else:
        location, what = cfg.checkpoint, "checkpoint"
    checkpoint = check_model_dir(storage.local_checkpoint(location, workdir, what), what, captioner_ok=True)
    if not storage.is_uri(location):
        location = str(checkpoint)
    return Source(checkpoint, location, sweep, records)


def resolve_teacher(cfg: ExportJobConfig, source: Source, tracking_uri: str) -> Path | None:
    """The teacher that taught the checkpoint: ``cfg.teacher``, else the training run's MLflow tag, else
    its job file (``teacher`` resolved from the current directory); None if none of them is a teacher."""
    candidates = [cfg.teacher] if cfg.teacher is not None else []
    saved = run_record(source, names.MLFLOW_RUN_FILE)
    if saved:
        try:
            from mlflow.tracking import MlflowClient

            run = MlflowClient(saved.get("tracking_uri") or tracking_uri).get_run(saved["run_id"])
            if run.data.tags.get(names.TAG_TEACHER_PATH):
                candidates.append(Path(run.data.tags[names.TAG_TEACHER_PATH]))
        except Exception:  # noqa: BLE001 -- a store that moved or was deleted: try the job file
            pass
    job = run_record(source, names.JOB_FILE)
    if job and job.get("teacher"):
        candidates.append(Path(job["teacher"]))
    for candidate in candidates:
        try:
            return check_model_dir(candidate, "teacher", needs_data=False)
        except ConfigError:
            if cfg.teacher is not None and candidate == cfg.teacher:
                raise
    return None


# ------------------------------------------------------------------ loading and measuring


@dataclass
class Loaded:
    model: torch.nn.Module
    val: VQASplit
    weights_sha256: str


def load_model_and_val(directory: Path, data: DataSource | None = None) -> Loaded:
    """The model in ``directory`` and the validation split as it reads it: its own pre-processing and
    labels, on ``data`` (default: the data it was trained on, its ``benchmark.json``)."""
    model = ViltAdapter.load(directory).eval()
    val = split_for_model(directory, "val", data)
    return Loaded(model, val, file_sha256(directory / "model.safetensors"))


def student_data(checkpoint: Path) -> DataSource:
    """The data source a student checkpoint was trained on (its ``benchmark.json``)."""
    return source_from_dict(json.loads((checkpoint / names.BENCHMARK_FILE).read_text()))


def first_examples(split: VQASplit, count: int) -> list[dict[str, torch.Tensor]]:
    indices = torch.arange(min(count, len(split)))
    return [split.batch(indices[i : i + EVAL_BATCH]) for i in range(0, len(indices), EVAL_BATCH)]


def parity(model: torch.nn.Module, session, batches: list[dict]) -> dict[str, float]:
    """``max_abs_logit_diff``, ``top1_agreement`` and ``examples`` of ONNX Runtime against PyTorch."""
    expected = onnx_tools.torch_logits(model, batches)
    got = onnx_tools.ort_logits(session, batches)
    if got.shape != expected.shape:
        return {"max_abs_logit_diff": float("inf"), "top1_agreement": 0.0, "examples": int(expected.shape[0])}
    diff = float(np.abs(got - expected).max()) if np.isfinite(got).all() else float("inf")
    agreement = float((got.argmax(-1) == expected.argmax(-1)).mean())
    return {"max_abs_logit_diff": diff, "top1_agreement": agreement, "examples": int(expected.shape[0])}


def passes_parity(figures: dict, cfg: ExportJobConfig) -> bool:
    return figures["max_abs_logit_diff"] <= cfg.gates.max_abs_logit_diff and figures["top1_agreement"] >= cfg.gates.min_top1_agreement


def describe_parity(figures: dict, cfg: ExportJobConfig) -> str:
    return (
        f"max |logit diff| {figures['max_abs_logit_diff']:.3g} (allowed {cfg.gates.max_abs_logit_diff:g}), "
        f"top-1 agreement {figures['top1_agreement']:.2%} (required {cfg.gates.min_top1_agreement:.0%}) "
        f"on {figures['examples']} validation examples"
    )


def ort_accuracy(session, split: VQASplit) -> float:
    return ort_scores(session, split)["accuracy"]


def ort_scores(session, split: VQASplit) -> dict[str, float]:
    """Exact-match ``accuracy`` of an ONNX Runtime session on ``split``, and VQA's soft
    ``vqa_accuracy`` (min(#humans/3, 1), leave-one-out) where the split has human answers."""
    logits = onnx_tools.ort_logits(session, split.batches(EVAL_BATCH))
    predictions = torch.from_numpy(logits).argmax(-1)
    scores = {"accuracy": float((predictions == split.labels).float().mean())}
    if split.human_answers is not None:
        scores["vqa_accuracy"] = float(split.human_answers.accuracy(predictions).mean())
    return scores


def ort_latency(session, split: VQASplit, repeats: int) -> dict[str, float]:
    feed = onnx_tools.model_inputs(split.batch(torch.arange(1)))
    return onnx_tools.latency_ms(lambda: session.run([onnx_tools.OUTPUT_NAME], feed), repeats=repeats)


def int8_gate(accuracy_fp32: float, accuracy_int8: float, allowed_drop: float, examples: int) -> dict:
    """The int8 gate's figures: accuracies, ``drop`` (fp32 - int8, in accuracy units) and what is allowed."""
    return {"val_accuracy_fp32": accuracy_fp32, "val_accuracy_int8": accuracy_int8, "drop": accuracy_fp32 - accuracy_int8,
            "allowed_drop": allowed_drop, "examples": examples}


def int8_failure(gate: dict) -> str | None:
    """None if the int8 model may ship, else the message. A tolerance of 1e-9 absorbs float rounding
    of accuracies that differ by exactly the allowed drop."""
    if gate["drop"] <= gate["allowed_drop"] + 1e-9:
        return None
    return (
        f"int8 gate failed: validation accuracy {gate['val_accuracy_int8']:.2%} vs fp32 {gate['val_accuracy_fp32']:.2%} "
        f"(drop {gate['drop'] * 100:.2f} points, allowed {gate['allowed_drop'] * 100:.2f}) on {gate['examples']} examples"
    )


# ------------------------------------------------------------------ export with reuse


def export_checked(model, directory: Path, filename: str, example: dict, cfg: ExportJobConfig, weights_sha256: str) -> tuple[Path, bool]:
    """Export ``model`` to ``directory/filename`` unless the manifest shows the same weights, exporter
    and opset made the file already; returns ``(path, reused)``."""
    path = directory / filename
    manifest_file = directory / MANIFEST
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    wanted = {"weights_sha256": weights_sha256, "exporter": cfg.exporter, "opset": cfg.opset}
    if not cfg.force_export and path.is_file() and manifest.get(filename) == wanted:
        return path, True
    started = time.perf_counter()
    onnx_tools.export_onnx(model, path, example, exporter=cfg.exporter, opset=cfg.opset)
    manifest[filename] = wanted
    manifest_file.write_text(json.dumps(manifest, indent=2))
    _log(f"exported {path} ({cfg.exporter}, opset {cfg.opset}) in {time.perf_counter() - started:.1f} s")
    return path, False


def verified_fp32(loaded: Loaded, directory: Path, filename: str, cfg: ExportJobConfig, threads: int | None) -> tuple[Path, object, dict]:
    """Export (or reuse) and pass the parity gate; returns ``(path, session, figures)`` or raises GateFailed."""
    batches = first_examples(loaded.val, cfg.gates.parity_examples)
    example = loaded.val.batch(torch.arange(min(2, len(loaded.val))))
    path, reused = export_checked(loaded.model, directory, filename, example, cfg, loaded.weights_sha256)
    try:
        session = onnx_tools.open_session(path, threads=threads)
        figures = parity(loaded.model, session, batches)
    except ValueError as err:
        hint = " (a reused file: re-run with --force-export to export it again)" if reused else ""
        raise GateFailed(f"parity gate failed for {path}: {err}{hint}") from None
    if not passes_parity(figures, cfg):
        hint = " (the file was reused from an earlier export: re-run with --force-export)" if reused else ""
        raise GateFailed(f"parity gate failed for {path}: {describe_parity(figures, cfg)}{hint}")
    return path, session, {**figures, "reused_export": reused}


# ------------------------------------------------------------------ the job


def main(cfg: ExportJobConfig, workdir: str | Path, tracking_uri: str | None = None) -> dict:
    """Export, gate and (``cfg.registry.enabled``) register; returns the report (also ``report.json``)."""
    workdir = Path(workdir).resolve()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    uri = resolve_tracking_uri(workdir, tracking_uri)
    source = resolve_source(cfg, workdir)
    name = cfg.name or f"{storage.name(source.run_dir)}-{storage.name(source.location)}"
    if (source.checkpoint / CAPTIONER_FILE).is_file():  # a captioner: two graphs, a pyfunc model (its teacher is not registered)
        from pipeline import export_captioner

        return export_captioner.main(cfg, workdir, uri, source, name)
    teacher_dir = resolve_teacher(cfg, source, uri)
    directory = workdir / "exports" / name
    directory.mkdir(parents=True, exist_ok=True)
    student = load_model_and_val(source.checkpoint)
    config = student.model.config
    report: dict = {
        "name": name,
        "checkpoint": source.location,
        "teacher": str(teacher_dir) if teacher_dir else None,
        **shape_summary(config),
        "parameters": sum(p.numel() for p in student.model.parameters()),
        "weights_sha256": student.weights_sha256,
        "gates": {},
        "passed": False,
    }
    try:
        _gate_and_measure(cfg, student, directory, report)
    except GateFailed as err:
        report["failure"] = str(err)
        (directory / REPORT).write_text(json.dumps(report, indent=2))
        raise
    if cfg.registry.enabled:
        report["registry"] = _register(cfg, report, student, teacher_dir, source, directory, workdir, uri)
    (directory / REPORT).write_text(json.dumps(report, indent=2))
    return report


def _gate_and_measure(cfg: ExportJobConfig, student: Loaded, directory: Path, report: dict) -> None:
    threads = cfg.threads
    path, session, figures = verified_fp32(student, directory, "student.onnx", cfg, threads)
    report["gates"]["parity_fp32"] = figures
    _log(f"parity fp32: {describe_parity(figures, cfg)}: passed")
    shipped, shipped_session, precision = path, session, "fp32"

    if cfg.optimize:
        optimized = directory / "student.opt.onnx"
        # a pruned model's layers may differ in head count: then 0 lets the optimizer try to read each from the graph
        uniform = len(set(report["heads_per_layer"])) == 1
        how = onnx_tools.optimize_graph(path, optimized, heads=report["heads"] if uniform else 0, hidden=report["hidden_size"])
        try:
            opt_session = onnx_tools.open_session(optimized, threads=threads)
            opt_figures = parity(student.model, opt_session, first_examples(student.val, cfg.gates.parity_examples))
        except ValueError as err:
            opt_figures, opt_session = {"error": str(err)}, None
        # Only a graph that passes the same parity gate is even timed; one that fails is never shipped.
        if opt_session is None:
            kept, reason = False, f"not kept: {opt_figures['error']}"
        elif not passes_parity(opt_figures, cfg):
            kept, reason = False, f"not kept: failed the parity gate ({describe_parity(opt_figures, cfg)})"
        else:
            plain_ms = ort_latency(session, student.val, cfg.latency_repeats)["p50"]
            opt_ms = ort_latency(opt_session, student.val, cfg.latency_repeats)["p50"]
            opt_figures = {**opt_figures, "p50_ms_plain": plain_ms, "p50_ms_optimized": opt_ms}
            kept = opt_ms <= plain_ms * 1.02  # an "optimised" graph that is not faster is not shipped
            reason = f"{'kept' if kept else 'not kept'}: passed the parity gate, batch-1 p50 {opt_ms:.3f} vs {plain_ms:.3f} ms plain"
        report["gates"]["parity_optimized"] = {**opt_figures, "method": how, "kept": kept, "reason": reason}
        _log(f"graph optimisation ({how}): {reason}")
        if kept:
            shipped, shipped_session = optimized, opt_session

    accuracy_fp32 = ort_accuracy(shipped_session, student.val)
    report["val_accuracy_fp32"] = accuracy_fp32
    if cfg.int8:
        quantized = onnx_tools.quantize_int8(path, directory / "student.int8.onnx")
        int8_session = onnx_tools.open_session(quantized, threads=threads)
        gate = int8_gate(accuracy_fp32, ort_accuracy(int8_session, student.val), cfg.gates.int8_max_accuracy_drop, len(student.val))
        report["gates"]["int8_accuracy"] = gate
        failure = int8_failure(gate)
        if failure:
            raise GateFailed(failure)
        accuracy_int8 = gate["val_accuracy_int8"]
        _log(f"int8: val accuracy {accuracy_int8:.2%} vs fp32 {accuracy_fp32:.2%}: passed")
        shipped, shipped_session, precision = quantized, int8_session, "int8"

    report["val_accuracy"] = accuracy_fp32 if precision == "fp32" else report["gates"]["int8_accuracy"]["val_accuracy_int8"]
    report["latency_ms_b1"] = ort_latency(shipped_session, student.val, cfg.latency_repeats)
    report["shipped"] = {"file": str(shipped), "precision": precision, "providers": shipped_session.get_providers()}
    report["passed"] = True
    _log(
        f"shipping {shipped.name} ({precision}): val accuracy {report['val_accuracy']:.2%}, "
        f"batch-1 p50 {report['latency_ms_b1']['p50']:.2f} ms on {shipped_session.get_providers()[0]}"
    )


def _register(cfg, report: dict, student: Loaded, teacher_dir: Path | None, source: Source, directory: Path, workdir: Path, uri: str) -> dict:
    registry = Registry(uri)
    run_id = registry.start_run("amad-export", report["name"], workdir / DEFAULT_ARTIFACTS)
    try:
        teacher = _register_teacher(cfg, registry, teacher_dir, directory.parent, run_id, student_data(source.checkpoint)) if teacher_dir else None
        config = student.model.config
        example = onnx_tools.model_inputs(student.val.batch(torch.arange(min(2, len(student.val)))))
        tags = {
            TAG_WEIGHTS_SHA: student.weights_sha256,
            TAG_VAL_ACCURACY: f"{report['val_accuracy']:.6f}",
            "checkpoint": report["checkpoint"],
            "heads": str(report["heads"]),
            "layers": str(report["layers"]),
            "parameters": str(report["parameters"]),
            "precision": report["shipped"]["precision"],
            "parity.max_abs_logit_diff": f"{report['gates']['parity_fp32']['max_abs_logit_diff']:.3g}",
            "parity.top1_agreement": f"{report['gates']['parity_fp32']['top1_agreement']:.6f}",
            "parity.examples": str(report["gates"]["parity_fp32"]["examples"]),
            "latency.p50_ms_b1": f"{report['latency_ms_b1']['p50']:.4f}",
            "latency.p99_ms_b1": f"{report['latency_ms_b1']['p99']:.4f}",
            "export_run_id": run_id,
        }
        if "int8_accuracy" in report["gates"]:
            tags["int8.accuracy_drop"] = f"{report['gates']['int8_accuracy']['drop']:.6f}"
        if teacher:
            tags.update({"teacher.model": teacher["name"], "teacher.version": teacher["version"]})
        training_run = run_record(source, names.MLFLOW_RUN_FILE)
        if training_run and training_run.get("run_id"):
            tags["training_run_id"] = training_run["run_id"]
        if source.sweep:
            chosen = source.sweep["best"]
            tags["sweep.name"] = str(source.sweep.get("sweep"))
            tags["sweep.parent_run_id"] = str((source.sweep.get("mlflow") or {}).get("run_id"))
            tags["sweep.trial_id"] = str(chosen.get("trial_id"))
            tags["sweep.trial_run_id"] = str(chosen.get("run_id"))
            for key, value in (chosen.get("params") or {}).items():
                tags[f"trial.{key}"] = value if isinstance(value, str) else json.dumps(value)
        _log_run_figures(registry, run_id, report)
        version, model_uri = registry.log_and_register(
            run_id=run_id,
            onnx_path=Path(report["shipped"]["file"]),
            name=cfg.registry.student_model,
            artifact_name="student",
            signature=onnx_signature(config.num_labels, config.image_size, masked="pixel_mask" in example),
            input_example=example,
            providers=onnx_tools.machine_providers(),
            tags=tags,
            extra_files=serving_files(source.checkpoint),
        )
        alias, reason = registry.promote(
            cfg.registry.student_model, version, report["val_accuracy"], promote=cfg.registry.promote, require_no_worse=cfg.registry.require_no_worse
        )
        registry.client.set_terminated(run_id, "FINISHED")
    except BaseException:
        registry.client.set_terminated(run_id, "FAILED")
        raise
    _log(f"registered {cfg.registry.student_model} v{version} as @{alias} ({reason})")
    return {"model": cfg.registry.student_model, "version": version, "alias": alias, "reason": reason,
            "model_uri": model_uri, "run_id": run_id, "tracking_uri": uri, "teacher": teacher}


def serving_files(model_dir: Path) -> list[Path]:
    """The files a server needs beside the ONNX graph: config (labels, image size), the pre-processing's
    files (:meth:`amad.data.preprocess.Preprocessor.files`) and the data spec, where there is one."""
    files = [model_dir / "config.json", *load_preprocessor(model_dir).files()]
    if (model_dir / names.BENCHMARK_FILE).is_file():
        files.append(model_dir / names.BENCHMARK_FILE)
    return files


def _log_run_figures(registry: Registry, run_id: str, report: dict) -> None:
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    metrics = {
        "val_accuracy": report["val_accuracy"],
        "val_accuracy_fp32": report["val_accuracy_fp32"],
        "parity_max_abs_logit_diff": report["gates"]["parity_fp32"]["max_abs_logit_diff"],
        "parity_top1_agreement": report["gates"]["parity_fp32"]["top1_agreement"],
        "latency_p50_ms_b1": report["latency_ms_b1"]["p50"],
        "latency_p99_ms_b1": report["latency_ms_b1"]["p99"],
    }
    params = {k: str(report[k]) for k in ("checkpoint", "heads", "layers", "hidden_size", "parameters")}
    registry.client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
        params=[Param(k, v) for k, v in params.items()],
    )


def _register_teacher(cfg: ExportJobConfig, registry: Registry, teacher_dir: Path, exports: Path, run_id: str, data: DataSource) -> dict:
    """The teacher's registered version: found by its weights' hash, else exported, gated and registered."""
    sha = file_sha256(teacher_dir / "model.safetensors")
    name = cfg.registry.teacher_model
    found = registry.find_by_tag(name, TAG_WEIGHTS_SHA, sha)
    if found is not None:
        return {"name": name, "version": str(found.version), "new": False}
    teacher = load_model_and_val(teacher_dir, data)  # validated on the student's data, as the teacher reads it
    directory = exports / f"teacher-{sha[:12]}"
    directory.mkdir(parents=True, exist_ok=True)
    path, _, figures = verified_fp32(teacher, directory, "teacher.onnx", cfg, cfg.threads)
    config = teacher.model.config
    example = onnx_tools.model_inputs(teacher.val.batch(torch.arange(min(2, len(teacher.val)))))
    version, _ = registry.log_and_register(
        run_id=run_id,
        onnx_path=path,
        name=name,
        artifact_name="teacher",
        signature=onnx_signature(config.num_labels, config.image_size, masked="pixel_mask" in example),
        input_example=example,
        providers=onnx_tools.machine_providers(),
        tags={
            TAG_WEIGHTS_SHA: sha,
            "path": str(teacher_dir),
            "heads": str(config.num_attention_heads),
            "layers": str(config.num_hidden_layers),
            "parity.max_abs_logit_diff": f"{figures['max_abs_logit_diff']:.3g}",
        },
        extra_files=serving_files(teacher_dir),
    )
    # The first teacher version is the champion teacher; later ones are registered without moving it.
    if registry.alias_version(name, "champion") is None:
        registry.client.set_registered_model_alias(name, "champion", version)
    _log(f"registered teacher {name} v{version} ({teacher_dir})")
    return {"name": name, "version": version, "new": True}
