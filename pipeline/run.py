"""``amad run``: the whole pipeline, stage by stage, each reused when its inputs have not changed.

teacher -> sweep (distillation trials on Ray Tune + Train) -> selection -> ONNX export and gates ->
registry (``champion`` moves only when the gates pass) -> Serve smoke test -> report.

Every stage has a key: a hash of its settings and of the keys/results of the stages it reads. A
finished stage records ``{"key", "result"}`` in ``<workdir>/pipeline_state.json``; a later run with
the same key reuses the result instead of running again, so re-running a finished command trains
nothing. The sweep is named after its key (``<sweep name>-<key[:8]>``): an interrupted run finds
the sweep directory and resumes it (``Tuner.restore``) instead of starting over; a changed config
makes a new sweep and never mixes trials of two configs.

A captioning teacher (``model.family: ved`` in the teacher YAML, or a captioner's directory) makes it a
captioning run: the same stages with the sweep selecting by validation CIDEr-D, ``amad-captioner`` in the
registry, the smoke test on ``POST /v1/caption`` and a report of CIDEr-D, BLEU-4, caption latency and
the alignment heatmaps per attention kind (:mod:`pipeline.run_captioning`).

MLflow: one ``amad-run`` run per pipeline run (stage keys as params; stage results, the sweep's
parent run and the export run as tags; the report as artifacts). The sweep and export runs are tagged
``amad.pipeline_run_id`` back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import NamedTuple

from pipeline import names, storage
from pipeline.config import CaptionTeacherJobConfig, ConfigError, load_config, parse_config, read_yaml, teacher_job_model
from pipeline.export_config import ExportJobConfig
from pipeline.local_cluster import connected, release_placement_groups
from pipeline.run_config import ReportConfig, RunJobConfig
from pipeline.sweep_config import SweepConfig
from pipeline.tracking import RunTracker, open_run, resolve_tracking_uri

STATE_FILE = "pipeline_state.json"
RUN_EXPERIMENT = "amad-run"
STAGES = ("teacher", "sweep", "export", "smoke", "report")


def _log(message: str) -> None:
    print(message, flush=True)


def stage_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class State:
    """``<workdir>/pipeline_state.json``: per stage, the key it ran with and its result. Written
    atomically after every stage, so an interrupted run keeps what finished."""

    def __init__(self, path: Path):
        self.path = path
        self.stages = json.loads(path.read_text()) if path.is_file() else {}

    def cached(self, stage: str, key: str):
        record = self.stages.get(stage)
        return record["result"] if record and record.get("key") == key else None

    def record(self, stage: str, key: str, result) -> None:
        self.stages[stage] = {"key": key, "result": result, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.stages, indent=2, default=str))
        os.replace(partial, self.path)


class Settings:
    """Every config ``amad run`` needs, read and validated before any stage starts."""

    def __init__(self, cfg: RunJobConfig):
        self.cfg = cfg
        self.teacher_job = None
        if cfg.teacher.train_config:
            values = read_yaml(cfg.teacher.train_config)
            self.teacher_job = load_config(cfg.teacher.train_config, teacher_job_model(values))
        self.sweep = load_config(cfg.sweep, SweepConfig)
        if cfg.storage.path is not None:  # the run's storage replaces the sweep YAML's
            self.sweep = self.sweep.model_copy(update={"storage": cfg.storage})
        storage.check(self.sweep.storage.path, storage.CONFIG_KEY if cfg.storage.path is not None else f"{cfg.sweep}: {storage.CONFIG_KEY}")
        self.export = load_config(cfg.export, ExportJobConfig)
        if self.export.checkpoint is not None or self.export.sweep is not None:
            raise ConfigError(f"{cfg.export}: leave checkpoint/sweep unset: amad run exports the sweep's choice")
        self.teacher_dir: Path | None = None
        if cfg.teacher.path is not None:
            from amad.hf_checkpoint import locate_teacher
            from pipeline.export import check_model_dir

            try:
                self.teacher_dir = locate_teacher(cfg.teacher.path)  # a directory, or a hub name downloaded into the hub's cache
            except ValueError as err:
                raise ConfigError(f"teacher.path: {err}") from None
            check_model_dir(self.teacher_dir, "teacher.path", needs_data=False, captioner_ok=True)
        self.family = "ved" if self._teacher_is_captioner() else "vilt"
        self._check_family()

    def _teacher_is_captioner(self) -> bool:
        from pipeline.export import CAPTIONER_FILE

        if self.teacher_job is not None:
            return isinstance(self.teacher_job, CaptionTeacherJobConfig)
        return (self.teacher_dir / CAPTIONER_FILE).is_file()

    def _check_family(self) -> None:
        """The sweep, export and report settings must suit the teacher's family: one clear message before any stage runs."""
        from amad.models import ViltAdapter
        from amad.models_ved import VedAdapter

        cfg, metric = self.cfg, self.sweep.job.selection_metric
        teacher = "a captioner (model.family: ved)" if self.family == "ved" else "a VQA model (ViLT)"
        kinds = {"vilt": ViltAdapter.kinds, "ved": VedAdapter.kinds}[self.family]
        objective = self.sweep.job.objective
        if objective.method != "none" and not set(objective.kinds) <= set(kinds):
            raise ConfigError(f"{cfg.sweep}: job.objective.kinds={list(objective.kinds)} are not attention kinds of the teacher, {teacher} "
                              f"(it has {list(kinds)}): a sweep made for the other family?")
        if metric is not None and metric not in names.SELECTION_METRICS[self.family]:
            raise ConfigError(f"{cfg.sweep}: job.selection_metric={metric} does not suit the teacher, {teacher}: "
                              f"use one of {', '.join(names.SELECTION_METRICS[self.family])}")
        if self.family == "ved":
            if cfg.report.max_accuracy_drop is not None:
                raise ConfigError("report.max_accuracy_drop: the teacher is a captioner; its quality target is report.max_cider_drop")
            if self.export.int8:
                raise ConfigError(f"{cfg.export}: int8: a captioner ships fp32 graphs; set int8: false")
        elif cfg.report.max_cider_drop is not None:
            raise ConfigError("report.max_cider_drop: the teacher is a VQA model; its quality target is report.max_accuracy_drop")


def main(cfg: RunJobConfig, workdir: str | Path, address: str | None = None, tracking_uri: str | None = None, serve: bool = False) -> dict:
    """Run (or resume, or reuse) every stage; returns the per-stage results."""
    import ray

    settings = Settings(cfg)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    uri = resolve_tracking_uri(workdir, tracking_uri)
    state = State(workdir / STATE_FILE)
    ray_context = contextlib.ExitStack()  # Ray starts when the first stage that needs it runs: a fully reused run needs none

    def ensure_ray() -> None:
        if not ray.is_initialized():
            ray_context.enter_context(connected(address, object_store_memory=256 * 2**20))

    tracker = open_run(tracking_uri=uri, experiment=RUN_EXPERIMENT, run_name=cfg.name, run_dir=workdir / "run", workdir=workdir)
    results: dict = {}
    clock = time.perf_counter()
    try:
        for stage in STAGES:
            runner = {"teacher": _teacher, "sweep": _sweep, "export": _export, "smoke": _smoke, "report": _report}[stage]
            key = _key(stage, settings, results, serve)
            cached = state.cached(stage, key)
            started = time.perf_counter()
            if cached is not None:
                results[stage] = cached
                _log(f"[run {cfg.name}] {stage}: reused ({_summary(stage, cached)})")
            else:
                _log(f"[run {cfg.name}] {stage}: running")
                if stage in ("sweep", "smoke"):
                    ensure_ray()
                results[stage] = runner(settings, workdir, uri, results, tracker, serve)
                state.record(stage, key, results[stage])
                _log(f"[run {cfg.name}] {stage}: done in {time.perf_counter() - started:.0f} s ({_summary(stage, results[stage])})")
            tracker.log_params({f"stage.{stage}.key": key[:16]})
        seconds = time.perf_counter() - clock
        tracker.log_metrics({"pipeline_seconds": seconds}, step=0)
        tracker.finish("FINISHED")
        results["seconds"] = seconds
        results["mlflow"] = {"tracking_uri": uri, "run_id": tracker.run_id}
        (workdir / "run" / names.SUMMARY_FILE).write_text(json.dumps(results, indent=2, default=str))
        _log(f"[run {cfg.name}] finished in {seconds:.0f} s; report: {results['report']['markdown']}")
        if serve:
            _serve_until_interrupted(results["smoke"])  # --serve makes the smoke stage's key new: it ran
        return results
    except BaseException:
        tracker.finish("KILLED")
        raise
    finally:
        ray_context.close()


def _key(stage: str, settings: Settings, results: dict, serve: bool) -> str:
    cfg = settings.cfg
    if stage == "teacher":
        if settings.teacher_job is not None:
            return stage_key("train", settings.teacher_job.model_dump(mode="json"))
        from pipeline.registry import file_sha256

        path = settings.teacher_dir
        return stage_key("path", str(path), file_sha256(path / "model.safetensors"))
    if stage == "sweep":
        # without storage where it is the default: the key of a run recorded before storage existed stays the same
        sweep = storage.without_default_storage(settings.sweep.model_dump(mode="json", exclude={"job": {"teacher"}}))
        return stage_key(sweep, results["teacher"]["key"])
    if stage == "export":
        return stage_key(settings.export.model_dump(mode="json"), results["sweep"]["checkpoint"], results["sweep"]["weights_sha256"])
    if stage == "smoke":
        return stage_key(cfg.smoke.model_dump(mode="json"), results["export"]["model_uri"], serve)
    return stage_key(cfg.report.model_dump(mode="json"), results["export"]["model_uri"], results["sweep"]["key"])


def _summary(stage: str, result: dict) -> str:
    captions = result.get("family") == "ved"
    if stage == "teacher":
        return f"{result['path']}, " + (f"test CIDEr-D {result.get('test_cider_d')}" if captions else f"test accuracy {result.get('test_accuracy')}")
    if stage == "sweep":
        return f"trial {result['trial_id']} {result.get('metric', names.VAL_ACCURACY)} {result['val_score']:.4f}, {result['params']} params" \
            if "val_score" in result else f"trial {result['trial_id']} val_acc {result['val_accuracy']:.4f}, {result['params']} params"
    if stage == "export":
        return f"{result['model_uri']} @{result['alias']}, " + (f"val_cider_d {result['val_cider_d']:.4f}" if captions else f"val_acc {result['val_accuracy']:.4f}")
    if stage == "smoke":
        what = "captions" if captions else "answers"
        return "skipped" if result.get("skipped") else f"{result['agreed']}/{result['questions']} {what} agree over HTTP"
    return result["markdown"]


# ---------------------------------------------------------------- stages


def _teacher(settings: Settings, workdir: Path, uri: str, results: dict, tracker: RunTracker, serve: bool) -> dict:
    key = _key("teacher", settings, results, serve)
    if settings.family == "ved":
        from pipeline import run_captioning

        path = settings.teacher_dir
        if settings.teacher_job is not None:
            from pipeline import train_captioner

            path = workdir / "teacher"
            train_captioner.main(settings.teacher_job, workdir, path)
        tracker.set_tags({names.TAG_TEACHER_PATH: str(path)})
        return {"path": str(path), "family": "ved", **run_captioning.teacher_scores(path), "key": key}
    if settings.teacher_job is not None:
        from pipeline import train_teacher

        output = workdir / "teacher"
        metrics = train_teacher.main(settings.teacher_job, workdir, output)
        path = output
        accuracy = metrics["test"]["teacher"]["accuracy"]
    else:
        path = settings.teacher_dir
        metrics_file = path / "metrics.json"
        accuracy = json.loads(metrics_file.read_text())["test"]["teacher"]["accuracy"] if metrics_file.is_file() else None
    tracker.set_tags({names.TAG_TEACHER_PATH: str(path)})
    return {"path": str(path), "test_accuracy": accuracy, "key": key}


class SweepPlan(NamedTuple):
    key: str
    cfg: SweepConfig
    directory: Path
    resume: bool


def sweep_plan(settings: Settings, workdir: Path, results: dict) -> SweepPlan:
    """The sweep the sweep stage runs, and whether it resumes one.

    Named after the stage key (``<sweep name>-<key[:8]>``; the key hashes the sweep config and the
    teacher): a changed config, or a new teacher, gets a directory of its own and a new sweep, and
    never adds trials to another config's. The same config finds its directory again and resumes
    the sweep in it (an interrupted run).
    """
    key = _key("sweep", settings, results, serve=False)
    values = settings.sweep.model_dump(mode="json")
    values["name"] = f"{settings.sweep.name}-{key[:8]}"
    values["job"]["teacher"] = results["teacher"]["path"]
    cfg = parse_config(values, SweepConfig, f"{settings.cfg.sweep} (teacher: {results['teacher']['path']})")
    directory = Path(workdir) / "sweeps" / cfg.name
    return SweepPlan(key, cfg, directory, (directory / names.SWEEP_JOB_FILE).is_file())


def _sweep(settings: Settings, workdir: Path, uri: str, results: dict, tracker: RunTracker, serve: bool) -> dict:
    from pipeline import sweep
    from pipeline.registry import file_sha256

    key, cfg, sweep_dir, resume = sweep_plan(settings, workdir, results)
    if resume:
        _log(f"[run {settings.cfg.name}] sweep {cfg.name} exists: resuming it")
    summary = sweep.main(cfg, workdir, tracking_uri=uri, resume=resume)
    leaked = release_placement_groups()  # every trial has ended: nothing may still hold CPUs
    if leaked:
        _log(f"[run {settings.cfg.name}] released {leaked} placement group(s) left by stopped trials")
    if summary.get("interrupted"):
        raise KeyboardInterrupt(f"sweep {cfg.name} interrupted")
    best = summary.get("best")
    if not best:
        raise RuntimeError(f"sweep {cfg.name}: {summary.get('reason', 'no trial was chosen')}")
    tracker.set_tags({"sweep.name": cfg.name, "sweep.parent_run_id": summary["mlflow"]["run_id"], "sweep.best_trial": best["trial_id"]})
    _tag_back(uri, summary["mlflow"]["run_id"], tracker.run_id)
    metrics = best["metrics"]
    metric = summary.get("selection_metric", names.VAL_ACCURACY)
    scores = {"val_accuracy": metrics[names.VAL_ACCURACY]} if settings.family == "vilt" else {"family": "ved"}
    return {
        "name": cfg.name,
        "key": key,
        "trial_id": best["trial_id"],
        "trial_run_id": best["run_id"],
        "checkpoint": best["checkpoint"],  # in the sweep's storage: a path or a URI (local_checkpoint reads it)
        "weights_sha256": file_sha256(storage.local_checkpoint(best["checkpoint"], workdir) / "model.safetensors"),
        **scores,
        "metric": metric,
        "val_score": metrics[metric],
        "params": metrics[names.PARAMS],
        "latency_ms_per_example": metrics[names.LATENCY_MS],
        "plots": [str(p) for p in sorted((sweep_dir / "plots").glob("*.png"))],
        "objective": (best.get("config") or {}).get("objective", {}),
        "counts": summary["counts"],
    }


def _export(settings: Settings, workdir: Path, uri: str, results: dict, tracker: RunTracker, serve: bool) -> dict:
    from pipeline import export

    values = settings.export.model_dump(mode="json")
    values.update(sweep=results["sweep"]["name"], teacher=results["teacher"]["path"], name=f"{settings.cfg.name}-{results['sweep']['name']}")
    report = export.main(parse_config(values, ExportJobConfig, str(settings.cfg.export)), workdir, tracking_uri=uri)
    registered = report.get("registry") or {}
    if registered:
        tracker.set_tags({"registry.model": registered["model"], "registry.version": registered["version"], "registry.alias": registered["alias"]})
        _tag_back(uri, registered["run_id"], tracker.run_id)
    if settings.family == "ved":
        return {
            "family": "ved",
            "report": str(workdir / "exports" / report["name"] / export.REPORT),
            "encoder": report["shipped"]["encoder"], "decoder": report["shipped"]["decoder"], "precision": report["shipped"]["precision"],
            "val_cider_d": report["val_cider_d"], "val_bleu_4": report["val_bleu_4"],
            "model_uri": f"models:/{registered['model']}/{registered['version']}" if registered else None,
            "alias": registered.get("alias"),
        }
    return {
        "report": str(workdir / "exports" / report["name"] / export.REPORT),
        "onnx": report["shipped"]["file"],
        "precision": report["shipped"]["precision"],
        "val_accuracy": report["val_accuracy"],
        "model_uri": f"models:/{registered['model']}/{registered['version']}" if registered else None,
        "alias": registered.get("alias"),
        "teacher_onnx": _teacher_onnx(workdir, registered),
    }


def _teacher_onnx(workdir: Path, registered: dict) -> str | None:
    teacher = (registered or {}).get("teacher") or {}
    matches = sorted((workdir / "exports").glob("teacher-*/teacher.onnx"))
    return str(matches[-1]) if teacher and matches else None


def _smoke(settings: Settings, workdir: Path, uri: str, results: dict, tracker: RunTracker, serve: bool) -> dict:
    if not settings.cfg.smoke.enabled and not serve:
        return {"skipped": True}
    if settings.family == "ved":
        return _smoke_captions(settings, workdir, uri, results, tracker, serve)
    from pipeline import run_smoke

    outcome = run_smoke.check(
        model_uri=results["export"]["model_uri"], tracking_uri=uri, onnx_file=results["export"]["onnx"],
        checkpoint=storage.local_checkpoint(results["sweep"]["checkpoint"], workdir), questions=settings.cfg.smoke.questions, port=settings.cfg.smoke.port, keep_running=serve,
    )
    tracker.log_metrics({"smoke_agreement": outcome["agreed"] / outcome["questions"]}, step=0)
    if outcome["agreed"] != outcome["questions"]:
        raise RuntimeError(f"smoke test: only {outcome['agreed']}/{outcome['questions']} served answers equal the offline ones")
    return outcome


def _smoke_captions(settings: Settings, workdir: Path, uri: str, results: dict, tracker: RunTracker, serve: bool) -> dict:
    from pipeline import run_captioning

    if results["export"]["model_uri"] is None:
        raise RuntimeError("smoke test: nothing was registered (registry.enabled: false); disable smoke.enabled too")
    outcome = run_captioning.smoke(
        model_uri=results["export"]["model_uri"], tracking_uri=uri, encoder=results["export"]["encoder"], decoder=results["export"]["decoder"],
        checkpoint=storage.local_checkpoint(results["sweep"]["checkpoint"], workdir), images=settings.cfg.smoke.questions,
        port=settings.cfg.smoke.port, keep_running=serve,
    )
    tracker.log_metrics({"smoke_agreement": outcome["agreed"] / outcome["questions"]}, step=0)
    if outcome["agreed"] != outcome["questions"]:
        raise RuntimeError(f"smoke test: only {outcome['agreed']}/{outcome['questions']} served captions equal the offline ones")
    return {"family": "ved", **outcome}


def _history(uri: str, run_id: str, metrics: tuple[str, ...], required: str) -> list[dict]:
    """Per epoch of one trial's MLflow run: ``metrics`` (epochs that logged ``required``)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    history = []
    for metric in metrics:
        for point in client.get_metric_history(run_id, metric):
            while len(history) < point.step:
                history.append({"epoch": len(history) + 1})
            history[point.step - 1][metric] = point.value
    return [h for h in history if required in h]


def _report_captions(settings: Settings, workdir: Path, uri: str, results: dict, tracker: RunTracker) -> dict:
    from mlflow.tracking import MlflowClient

    from amad.models_ved import VedAdapter
    from pipeline import run_captioning

    teacher_dir, checkpoint = Path(results["teacher"]["path"]), storage.local_checkpoint(results["sweep"]["checkpoint"], workdir)
    report = settings.cfg.report
    comparison = run_captioning.compare(teacher_dir, checkpoint, results["export"], report, workdir)
    objective = results["sweep"]["objective"]
    alignment = []
    if objective.get("method", "amad") == "amad":
        alignment = run_captioning.alignment_weights(VedAdapter.load(teacher_dir), VedAdapter.load(checkpoint), checkpoint, objective,
                                                     report.alignment_examples)
    history = _history(uri, results["sweep"]["trial_run_id"], (names.TRAIN_LOSS, names.VAL_LOSS, names.VAL_CIDER_D), names.VAL_CIDER_D)
    directory = run_captioning.report_dir(workdir)
    files = run_captioning.write_report(
        directory, comparison=comparison, alignment=alignment, history=history, sweep_plots=[Path(p) for p in results["sweep"]["plots"]],
        context={"name": settings.cfg.name, "teacher": str(teacher_dir), "sweep": results["sweep"]["name"], "trial": results["sweep"]["trial_id"],
                 "registered": results["export"]["model_uri"] or "(not registered)"},
    )
    client = MlflowClient(uri)
    for path in files:
        client.log_artifact(tracker.run_id, str(path), "report")
    tracker.log_metrics({"teacher_test_cider_d": comparison["teacher"]["cider_d"], "student_test_cider_d": comparison["student"]["cider_d"],
                         "teacher_test_bleu_4": comparison["teacher"]["bleu_4"], "student_test_bleu_4": comparison["student"]["bleu_4"],
                         "speedup_b1": comparison["speedup"]}, step=0)
    return {"markdown": str(directory / "report.md"), "files": [str(p) for p in files], "comparison": comparison}


def _report(settings: Settings, workdir: Path, uri: str, results: dict, tracker: RunTracker, serve: bool) -> dict:
    from mlflow.tracking import MlflowClient

    if settings.family == "ved":
        return _report_captions(settings, workdir, uri, results, tracker)

    from amad.models import ViltAdapter
    from pipeline import export, run_report

    teacher_dir, checkpoint = Path(results["teacher"]["path"]), storage.local_checkpoint(results["sweep"]["checkpoint"], workdir)
    teacher = export.load_model_and_val(teacher_dir, export.student_data(checkpoint))  # the student's data, as the teacher reads it
    student_model = ViltAdapter.load(checkpoint).eval()
    objective = results["sweep"]["objective"]
    alignment = run_report.alignment_weights(
        teacher.model, student_model, teacher.val, objective.get("layer_map", "uniform"),
        float(objective.get("amad_temperature", 1.0)), settings.cfg.report.alignment_examples,
    )
    comparison = _compare(teacher_dir, checkpoint, results, settings.cfg.report, workdir)
    client = MlflowClient(uri)
    history = _history(uri, results["sweep"]["trial_run_id"], (names.TRAIN_LOSS, names.VAL_LOSS, names.VAL_ACCURACY), names.VAL_ACCURACY)
    directory = workdir / run_report.REPORT_DIR
    files = run_report.write_report(
        directory, comparison=comparison, alignment=alignment, history=history,
        sweep_plots=[Path(p) for p in results["sweep"]["plots"]],
        context={"name": settings.cfg.name, "teacher": str(teacher_dir), "sweep": results["sweep"]["name"], "trial": results["sweep"]["trial_id"],
                 "registered": results["export"]["model_uri"] or "(not registered)"},
    )
    for path in files:
        client.log_artifact(tracker.run_id, str(path), "report")
    metrics = {"teacher_test_accuracy": comparison["teacher"]["accuracy"], "student_test_accuracy": comparison["student"]["accuracy"],
               "speedup_b1": comparison["speedup"]}
    if "vqa_accuracy" in comparison["student"]:
        metrics.update(teacher_test_vqa_accuracy=comparison["teacher"]["vqa_accuracy"], student_test_vqa_accuracy=comparison["student"]["vqa_accuracy"])
    tracker.log_metrics(metrics, step=0)
    return {"markdown": str(directory / "report.md"), "files": [str(p) for p in files], "comparison": comparison}


def _compare(teacher_dir: Path, checkpoint: Path, results: dict, report: ReportConfig, workdir: Path) -> dict:
    """Test accuracy, size and ONNX Runtime batch-1 latency of the teacher and the shipped student:
    the same runtime, the same thread count (``report.latency_threads``), the same questions, calls
    interleaved; and whether the report's targets are met."""
    import torch

    from amad.data.sources import split_for_model
    from amad.models import ViltAdapter, head_counts
    from pipeline import export, onnx_tools

    # the student's checkpoint records the data it was trained on, read with the teacher's pre-processing
    test = split_for_model(checkpoint, "test")
    teacher_onnx = results["export"]["teacher_onnx"]
    if teacher_onnx is None:  # registry disabled: export the teacher here (TorchScript: seconds)
        teacher_onnx = onnx_tools.export_onnx(ViltAdapter.load(teacher_dir).eval(), workdir / "report-teacher.onnx",
                                              test.batch(torch.arange(2)), exporter="torchscript")
    out = {"test_questions": len(test), "latency_threads": report.latency_threads, "latency_repeats": report.latency_repeats}
    feed = onnx_tools.model_inputs(test.batch(torch.arange(1)))
    calls = {}
    for label, directory, onnx_file in (("teacher", teacher_dir, teacher_onnx), ("student", checkpoint, results["export"]["onnx"])):
        model = ViltAdapter.load(directory)
        session = onnx_tools.open_session(onnx_file, threads=report.latency_threads)
        out[label] = {
            **export.ort_scores(session, test),
            "parameters": sum(p.numel() for p in model.parameters()),
            "heads": max(head_counts(model.config)), "heads_per_layer": head_counts(model.config), "layers": model.config.num_hidden_layers,
            "hidden": model.config.hidden_size, "pruned": bool(getattr(model.config, "amad_pruning", None)),
            "onnx": str(onnx_file),
        }
        calls[label] = lambda session=session: session.run([onnx_tools.OUTPUT_NAME], feed)
    for label, times in onnx_tools.interleaved_latency_ms(calls, repeats=report.latency_repeats).items():
        out[label]["p50_ms"], out[label]["p99_ms"] = times["p50"], times["p99"]
    out["speedup"] = out["teacher"]["p50_ms"] / out["student"]["p50_ms"]
    out["latency_ratio"] = out["student"]["p50_ms"] / out["teacher"]["p50_ms"]
    out["parameter_ratio"] = out["teacher"]["parameters"] / out["student"]["parameters"]
    out["accuracy_drop_points"] = (out["teacher"]["accuracy"] - out["student"]["accuracy"]) * 100
    out["targets"] = {}
    if report.max_accuracy_drop is not None:
        out["targets"]["accuracy"] = {"max_drop_points": report.max_accuracy_drop, "met": out["accuracy_drop_points"] <= report.max_accuracy_drop}
    if report.max_latency_ratio is not None:
        out["targets"]["latency"] = {"max_ratio": report.max_latency_ratio, "met": out["latency_ratio"] <= report.max_latency_ratio}
    return out


def _serve_until_interrupted(smoke: dict) -> None:
    """``--serve``: Serve (started by the smoke stage) keeps answering until Ctrl-C; the local Ray
    cluster this command started ends with it. Ctrl-C and SIGTERM (:mod:`pipeline.stopping`) stop Serve
    gracefully: the requests in flight finish first."""
    from serving.config import ServeConfig
    from serving.server import stop

    # The sweep stage's Ray Tune/Train leaves its SIGINT handler installed after it returns; Ctrl-C (and
    # SIGTERM, which runs the SIGINT handler while Ray is connected) would then call it and do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _log(f"[run] serving at {smoke['url']}  (Ctrl-C stops it)\n  try: {smoke['curl']}")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        _log("[run] stopping Serve")
    finally:
        stop(ServeConfig.model_fields["app_name"].default)


def _tag_back(uri: str, run_id: str, pipeline_run_id: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).set_tag(run_id, "amad.pipeline_run_id", pipeline_run_id)
