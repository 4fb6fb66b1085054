"""``amad distill``: distil a saved teacher into a smaller student with Ray Train (DDP).

setup (validate against the teacher and the cluster) -> fit (TorchTrainer, one checkpoint per
epoch, resumable) -> cleanup (best checkpoint to MLflow, ``summary.json``).

Runs are resumable by name. Ray Train V2 (2.60) keeps a checkpoint-manager snapshot in
``<storage>/ray/<run_name>/`` (storage: ``storage.path`` / ``--storage-path``, default the workdir; any
``pyarrow.fs`` URI, see :mod:`pipeline.storage`); a new ``fit`` with the same ``storage_path`` and ``name`` loads it and
``ray.train.get_checkpoint()`` returns the latest checkpoint, both after a worker failure (within
``max_failures``) and when the same command is run again. The worker loop
(:mod:`pipeline.distill_worker`) resumes at the next epoch with the optimizer, scheduler and step
count it saved. Every epoch is seeded from ``(seed, epoch)`` (data order) and ``(seed, epoch, rank)``
(torch RNG), so no RNG state needs saving for a resumed run to take the same steps as an
uninterrupted one.

A checkpoint directory holds the student as ``from_pretrained`` loads it (``config.json``,
``model.safetensors``), ``tokenizer.json``, ``benchmark.json`` (its data spec) and ``train_state.pt``.
The storage's run directory also holds ``job.json`` (and, when the storage is not the workdir, a copy
of ``mlflow_run.json``), so that whoever reads a checkpoint back finds its run; the driver keeps
``mlflow_run.json`` and ``summary.json`` in ``<workdir>/ray/<run_name>/``.

This module imports no model code at the top (:func:`check_job` imports it when called): a sweep's
trial actor builds and fits the trainer from it without paying for transformers.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from amad.data.benchmark import BenchmarkSpec
from amad.data.captions import CaptionSpec
from amad.data.preprocess import PROCESSOR_FILES, is_checkpoint_processor
from amad.data.sources import VQA_V2, DataSource, VqaV2Source, resolve_paths, source_from_dict, source_to_dict
from amad.data.text import TOKENIZER_FILE
from amad.hf_checkpoint import check_vilt_checkpoint, locate_teacher
from pipeline import names, storage
from pipeline.lean_trainer import lean_torch_trainer, preemption_watcher_env
from pipeline.local_cluster import connected, started_here
from pipeline.config import ConfigError, DistillJobConfig
from pipeline.tracking import RunTracker, flatten, open_run, resolve_tracking_uri

OWN_TEACHER_FILES = ("config.json", "model.safetensors", TOKENIZER_FILE)  # and benchmark.json for the generated data
CAPTIONER_FILE = "captions.json"  # the data spec of a captioner `amad teacher` saved (pipeline.train_captioner.CAPTIONS_FILE)


def _log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- setup: checks before anything runs


@dataclass(frozen=True)
class Teacher:
    """What the driver learns from a teacher directory without loading its weights."""

    path: Path
    data: DataSource  # the generated spec with the job's size overrides, or VQA-v2 files (absolute paths)
    test_accuracy: float | None  # VQA teachers; a captioner's test scores are in test_scores
    checkpoint: bool = False  # a Hugging Face checkpoint (its own processor), not a teacher `amad teacher` saved
    family: str = "vilt"  # the model family (amad.models.get_adapter): "vilt" answers questions, "ved" writes captions
    test_scores: dict | None = None  # a captioner's greedy test scores (bleu_1 ... cider_d) from its metrics.json

    @property
    def data_dict(self) -> dict:
        """The data source as ``benchmark.json`` and loop configs carry it."""
        return source_to_dict(self.data)

    @property
    def test_summary(self) -> str:
        """The teacher's test figure for logs and tags: accuracy, or a captioner's greedy CIDEr-D."""
        if self.family == "ved":
            cider = (self.test_scores or {}).get("cider_d")
            return "unknown" if cider is None else f"CIDEr-D {cider:.4f}"
        return "unknown" if self.test_accuracy is None else f"{self.test_accuracy:.6f}"


def data_spec(teacher_benchmark: dict, cfg: DistillJobConfig) -> BenchmarkSpec:
    values = dict(teacher_benchmark)
    for key in ("train_scenes", "val_scenes"):
        value = getattr(cfg.data, key)
        if value is not None:
            values[key] = value
    return BenchmarkSpec.from_dict(values)


def read_captioner(cfg: DistillJobConfig, path: Path) -> Teacher:
    """A captioning teacher `amad teacher` saved (``model.family: ved``): its files, its captions spec with the
    job's size overrides, and its test scores; ConfigError naming what is missing or wrong."""
    from amad.data.captions import CaptionSpec

    missing = [name for name in OWN_TEACHER_FILES if not (path / name).is_file()]
    if missing:
        raise ConfigError(f"teacher: {path} has {CAPTIONER_FILE} but is not a captioner `amad teacher` saved (missing {', '.join(missing)})")
    if cfg.data.source != "generated":
        raise ConfigError(
            f"data.source: {cfg.data.source} is a VQA data source; the captioning teacher {path} distils on the generated captions "
            f"it was trained on ({CAPTIONER_FILE}): remove data.source"
        )
    try:
        values = json.loads((path / CAPTIONER_FILE).read_text())
        for key in ("train_scenes", "val_scenes"):
            if getattr(cfg.data, key) is not None:
                values[key] = getattr(cfg.data, key)
        spec = CaptionSpec.from_dict(values)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"teacher: {path / CAPTIONER_FILE} is not a captions spec `amad teacher` wrote: {err}") from None
    scores = None
    metrics_file = path / "metrics.json"
    if metrics_file.is_file():
        scores = (json.loads(metrics_file.read_text()).get("test") or {}).get("teacher_greedy")
    return Teacher(path, spec, None, family="ved", test_scores=scores)


def read_teacher(cfg: DistillJobConfig) -> Teacher:
    """The job's :class:`Teacher` from the teacher directory's small JSON files; ConfigError if it is not one.

    A teacher is a directory `amad teacher` saved (a VQA model, or a captioner: ``captions.json``), or a
    Hugging Face ViLT VQA checkpoint (``config.json``, weights, the processor's and tokenizer's files; a
    local directory or a hub name), which reads VQA-v2 files (``data.source: vqa_v2``).
    Reads no weights and imports no model code: a sweep trial, whose job :func:`check_job` checked
    before Ray started, starts its run from this alone.
    """
    try:
        path = locate_teacher(cfg.teacher)  # a directory, or a hub name downloaded into the hub's cache
    except ValueError as err:
        raise ConfigError(f"teacher: {err}") from None
    if not path.is_dir():
        raise ConfigError(f"teacher: {path} is not a teacher directory saved by `amad teacher` nor a Hugging Face ViLT checkpoint (no such directory)")
    if (path / CAPTIONER_FILE).is_file():
        return read_captioner(cfg, path)
    checkpoint = is_checkpoint_processor(path)
    if checkpoint:
        try:
            check_vilt_checkpoint(path)
        except ValueError as err:
            raise ConfigError(f"teacher: {err}") from None
        if cfg.data.source != VQA_V2:
            raise ConfigError(
                f"data.source: the teacher {path} is a Hugging Face checkpoint, which reads VQA-v2 files: set data.source: vqa_v2 "
                "with train/val files (`amad data export-vqa-v2 --out DIR` writes the built-in benchmark in that format)"
            )
    else:
        needed = OWN_TEACHER_FILES + ((names.BENCHMARK_FILE,) if cfg.data.source == "generated" else ())
        missing = [name for name in needed if not (path / name).is_file()]
        if missing:
            raise ConfigError(
                f"teacher: {path} is not a teacher directory saved by `amad teacher` (missing {', '.join(missing)}) "
                f"nor a Hugging Face ViLT checkpoint (no {' or '.join(PROCESSOR_FILES)})"
            )
    test_accuracy = None
    metrics_file = path / "metrics.json"
    if metrics_file.is_file():
        test_accuracy = json.loads(metrics_file.read_text()).get("test", {}).get("teacher", {}).get("accuracy")
    if cfg.data.source == VQA_V2:
        data = resolve_paths(source_from_dict(cfg.data.vqa_v2_dict()), Path.cwd())
    else:
        data = data_spec(json.loads((path / names.BENCHMARK_FILE).read_text()), cfg)
    return Teacher(path, data, test_accuracy, checkpoint)


_CHECKED_DATA: dict[str, dict] = {}


def check_data(teacher: Teacher, splits: tuple[str, ...] = ("train", "val")) -> dict[str, dict[str, int]]:
    """Counts per split (``questions``, ``kept``, ``dropped_*``) of the job's data as the teacher reads it.

    VQA-v2 files are read once here, before Ray starts, so a missing file, a mismatched annotation
    file or answers outside the teacher's labels are reported now, with the dropped counts; images
    are only listed, not decoded. The generated benchmark is counted from its spec. Remembered per
    process (a sweep checks every trial's job against the same data).
    """
    if isinstance(teacher.data, CaptionSpec):  # every (image, reference) pair is a training example
        spec = teacher.data
        return {split: {"questions": getattr(spec, f"{split}_scenes") * spec.references_per_image} for split in splits}
    if not isinstance(teacher.data, VqaV2Source):
        spec = teacher.data
        return {split: {"questions": getattr(spec, f"{split}_scenes") * spec.questions_per_scene} for split in splits}
    key = json.dumps({"teacher": str(teacher.path), "data": teacher.data_dict, "splits": splits}, sort_keys=True)
    if key not in _CHECKED_DATA:
        from amad.data.preprocess import load_preprocessor
        from amad.data.sources import load_split, model_labels

        try:
            preprocessor = load_preprocessor(teacher.path)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"teacher: {err}") from None
        counts = {}
        for split in splits:
            try:
                counts[split] = load_split(teacher.data, split, preprocessor, model_labels(teacher.path))[1]
            except (ValueError, FileNotFoundError) as err:
                raise ConfigError(f"data.{split}: {err}") from None
        for split, count in counts.items():
            dropped = {k: v for k, v in count.items() if k.startswith("dropped_")}
            _log(f"data.{split}: {count['kept']} of {count['questions']} questions usable"
                 + (f" (dropped: {', '.join(f'{k[8:]} {v}' for k, v in dropped.items())})" if dropped else ""))
        _CHECKED_DATA[key] = counts
    return _CHECKED_DATA[key]


def check_job(cfg: DistillJobConfig) -> Teacher:
    """Everything that can be checked from the config and the teacher's small files; ConfigError if not.

    Reads ``config.json``, ``benchmark.json`` / ``captions.json`` and ``metrics.json`` only (no weights, no Ray).
    """
    from transformers import AutoConfig

    from amad.models import StudentSpec, get_adapter

    teacher = read_teacher(cfg)
    path = teacher.path
    teacher_config = AutoConfig.from_pretrained(str(path))
    try:
        adapter = get_adapter(teacher_config.model_type)
    except ValueError as err:
        raise ConfigError(f"teacher: {err}") from None
    if adapter.family != teacher.family:
        raise ConfigError(f"teacher: {path}/config.json is a {adapter.family} model ({teacher_config.model_type}) but the directory "
                          f"holds the data of a {teacher.family} teacher")
    if teacher.family == "ved" and teacher.data.scene.image_size != teacher_config.encoder.image_size:
        raise ConfigError(
            f"teacher: {path / CAPTIONER_FILE} draws {teacher.data.scene.image_size}-pixel images but the captioner's encoder takes "
            f"{teacher_config.encoder.image_size} pixels ({path}/config.json): the spec is not the one it was trained on"
        )
    try:
        names.selection_metric(teacher.family, cfg.selection_metric)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    spec = StudentSpec(cfg.student.heads, cfg.student.layers, cfg.student.resolved_head_dim(), cfg.student.intermediate_ratio)
    if cfg.student.init == "pruned":
        check_pruned_student(cfg, teacher_config, path)
    try:
        student_config = adapter.student_config(teacher_config, spec)
    except ValueError as err:
        raise ConfigError(f"student: {err}") from None
    if cfg.student.init == "teacher":
        if not hasattr(adapter, "check_teacher_init"):
            raise ConfigError(f"student.init: teacher (regrouped heads) is not available for {adapter.family} teachers; use pruned or random")
        try:
            adapter.check_teacher_init(teacher_config, student_config)
        except ValueError as err:
            raise ConfigError(f"student.init: {err}") from None
    objective = cfg.objective
    check_objective_for(cfg, adapter, teacher_config, student_config, path)
    if objective.method == "relation":
        for who, hidden in (("student", student_config.hidden_size), ("teacher", teacher_config.hidden_size)):
            if hidden % objective.relation_heads:
                raise ConfigError(f"objective.relation_heads={objective.relation_heads} does not divide the {who}'s hidden size {hidden}")

    if cfg.objective.task_loss == "vqa_bce" and cfg.data.source != VQA_V2:
        raise ConfigError("objective.task_loss: vqa_bce trains on the human answers of VQA-v2 files; set data.source: vqa_v2")
    counts = check_data(teacher)
    questions = counts["train"].get("kept", counts["train"]["questions"])
    if questions // cfg.scaling.num_workers < cfg.train.batch_size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size}: {questions} train {'captions' if teacher.family == 'ved' else 'questions'} over "
            f"scaling.num_workers={cfg.scaling.num_workers} leave fewer than one batch per worker"
        )
    return teacher


# Which stack's layers a kind of attention map indexes, per family (a layer map pairs those).
_KIND_STACKS = {"self": None, "encoder_self": "encoder", "decoder_self": "decoder", "cross": "decoder"}


def check_objective_for(cfg: DistillJobConfig, adapter, teacher_config, student_config, path: Path) -> None:
    """The objective's kinds exist in the family and its layer maps fit both models; ConfigError naming the key."""
    objective = cfg.objective
    if objective.method != "none":
        unknown_kinds = set(objective.kinds) - set(adapter.kinds)
        if unknown_kinds:
            hint = " (set objective.kinds, e.g. [encoder_self, decoder_self, cross])" if adapter.family == "ved" and objective.kinds == ("self",) else ""
            raise ConfigError(f"objective.kinds: {sorted(unknown_kinds)} are not attention kinds of {adapter.family} (it has {list(adapter.kinds)}){hint}")
    if objective.method == "relation" and adapter.family != "vilt":
        raise ConfigError(f"objective.method: relation (MiniLMv2) is implemented for ViLT only, not for {adapter.family} teachers")

    def layers(config, kind: str) -> int:
        stack = _KIND_STACKS.get(kind)
        return config.num_hidden_layers if stack is None else getattr(config, stack).num_hidden_layers

    for kind in objective.kinds:
        layer_map = (objective.layer_maps or {}).get(kind, objective.layer_map)
        if isinstance(layer_map, str):
            continue
        key = f"objective.layer_maps.{kind}" if kind in (objective.layer_maps or {}) else "objective.layer_map"
        student_layers, teacher_layers = layers(student_config, kind), layers(teacher_config, kind)
        for s, t in layer_map:
            if not (0 <= s < student_layers and 0 <= t < teacher_layers):
                raise ConfigError(
                    f"{key}: pair [{s}, {t}] is out of range{'' if kind == 'self' else f' for {kind} maps'}: the student has {student_layers} layers "
                    f"(student.layers) and the teacher {teacher_layers} ({path}/config.json); indices are 0-based"
                )


def check_pruned_student(cfg: DistillJobConfig, teacher_config, path: Path) -> None:
    """A pruned student keeps at most what the teacher has; ConfigError naming the key otherwise."""
    stacks = [("", teacher_config)] if not hasattr(teacher_config, "encoder") else [
        ("encoder ", teacher_config.encoder), ("decoder ", teacher_config.decoder)]
    for stack, part in stacks:
        for key, asked, has in (("heads", cfg.student.heads, part.num_attention_heads), ("layers", cfg.student.layers, part.num_hidden_layers)):
            if asked > has:
                raise ConfigError(
                    f"student.{key}={asked}: a pruned student keeps at most the teacher's {has} {stack}{key}"
                    f"{' per layer' if key == 'heads' else ''} ({path}/config.json)"
                )
    if getattr(teacher_config, "amad_pruning", None):
        raise ConfigError(f"student.init=pruned: the teacher {path} is itself pruned; prune an unpruned teacher")


def pruning_importance(cfg: DistillJobConfig, teacher: Teacher, workdir: Path) -> dict | None:
    """The teacher's head and FFN importance when the student is pruned from it (cached; see
    :mod:`pipeline.importance`), else None."""
    if cfg.student.init != "pruned":
        return None
    from pipeline.importance import teacher_importance

    return teacher_importance(teacher.path, teacher.data, cfg.student.importance_examples, workdir, log=_log)


def check_placement(cfg: DistillJobConfig) -> bool:
    """After ``ray.init``: can the cluster place every worker? Returns whether workers use a GPU.

    Counts per node (a worker's bundle cannot span nodes) from the nodes' total resources; resources
    other jobs hold right now only make ``fit`` wait, so they are not an error.
    """
    import ray

    scaling = cfg.scaling
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    gpu_slots = sum(math.floor(node.get("GPU", 0)) for node in nodes)
    use_gpu = scaling.use_gpu if isinstance(scaling.use_gpu, bool) else gpu_slots >= scaling.num_workers
    fits = 0
    for node in nodes:
        per_node = math.floor(node.get("CPU", 0) / scaling.cpus_per_worker + 1e-9)
        if use_gpu:
            per_node = min(per_node, math.floor(node.get("GPU", 0)))
        fits += per_node
    if fits < scaling.num_workers:
        cpus = ", ".join(f"{node.get('CPU', 0):g}" for node in nodes)
        gpus = f" and 1 GPU ({gpu_slots} in the cluster)" if use_gpu else ""
        raise ConfigError(
            f"scaling.num_workers={scaling.num_workers}: the cluster can place at most {fits} workers of "
            f"{scaling.cpus_per_worker:g} CPU{gpus} each (CPUs per node: {cpus}); lower scaling.num_workers "
            f"or scaling.cpus_per_worker, or add nodes"
        )
    return use_gpu


def _fingerprint(values: dict) -> dict:
    return {k: v for k, v in values.items() if k not in DistillJobConfig.RESUMABLE_CHANGES}


def check_resumable(cfg: DistillJobConfig, run_dir: str | Path) -> None:
    """A run directory of the same name (in the storage: a path or a URI) must have been started by the
    same training settings."""
    recorded = storage.read_text_or_none(storage.join(run_dir, names.JOB_FILE))
    if recorded is None:
        return
    previous = _fingerprint(storage.without_default_storage(json.loads(recorded)))
    current = _fingerprint(storage.without_default_storage(cfg.model_dump(mode="json")))
    changed = [key for key in sorted(set(previous) | set(current)) if previous.get(key) != current.get(key)]
    if changed:
        raise ConfigError(
            f"run_name={cfg.run_name!r}: {run_dir} holds a run started with different settings ({', '.join(changed)}); "
            "re-run with the original config to resume it, or choose another run name (--name)"
        )


# ---------------------------------------------------------------- the driver


def main(cfg: DistillJobConfig, workdir: str | Path, address: str | None = None, tracking_uri: str | None = None) -> dict:
    """Distil ``cfg.teacher`` into a student; returns (and writes to ``summary.json``) the outcome.

    Joins the Ray cluster already initialised in this process, else ``address`` /
    ``$RAY_ADDRESS``, else starts a local one (and shuts it down at the end). A bad config -- a storage
    no filesystem opens included -- raises :class:`ConfigError` before anything is written under
    ``workdir`` or the storage.
    """
    started = time.perf_counter()
    workdir = Path(workdir).resolve()
    store = storage.resolve(cfg.storage.path, workdir)
    teacher = check_job(cfg)
    with connected(address):
        return _run(cfg, teacher, workdir, tracking_uri, started, store)


def _run(cfg: DistillJobConfig, teacher: "Teacher", workdir: Path, tracking_uri: str | None, started: float,
         store: storage.Storage | None = None) -> dict:
    """:func:`main` once Ray is connected."""
    store = store or storage.resolve(cfg.storage.path, workdir)
    storage.warn_if_not_shared(store)
    use_gpu = check_placement(cfg)
    run_dir = workdir / "ray" / cfg.run_name  # this driver's files: mlflow_run.json, summary.json
    ray_dir = store.location("ray", cfg.run_name)  # Ray Train's run: checkpoints, its snapshot, job.json (the same directory by default)
    check_resumable(cfg, ray_dir)
    # -- nothing above writes; from here on the run exists
    run_dir.mkdir(parents=True, exist_ok=True)
    storage.write_text(storage.join(ray_dir, names.JOB_FILE), json.dumps(cfg.model_dump(mode="json"), indent=2))
    importance = pruning_importance(cfg, teacher, workdir)
    tracker = _open_tracking(cfg, teacher, workdir, run_dir, resolve_tracking_uri(workdir, tracking_uri), use_gpu)
    if ray_dir != str(run_dir):  # whoever reads a checkpoint back from the storage finds its MLflow run
        storage.write_text(storage.join(ray_dir, names.MLFLOW_RUN_FILE), (run_dir / names.MLFLOW_RUN_FILE).read_text())
    try:
        result = _fit(cfg, teacher, ray_dir, tracker, use_gpu, importance=importance)
    except BaseException:
        tracker.finish("FAILED")
        raise
    summary = _summarise(cfg, teacher, run_dir, tracker, result, use_gpu, time.perf_counter() - started, store, ray_dir)
    with storage.local_directory(summary["best_checkpoint"], workdir) as best:
        tracker.log_directory(best, names.BEST_CHECKPOINT_ARTIFACT, skip=(names.TRAIN_STATE_FILE,))
    tracker.set_tags({names.TAG_BEST_CHECKPOINT: summary["best_checkpoint"]})
    tracker.finish("FINISHED")
    (run_dir / names.SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    best, selection = summary["best"], summary["selection_metric"]
    _log(
        f"[{cfg.run_name}] best: epoch {best[names.EPOCH]} {selection} {best[selection]:.4f} "
        f"(teacher test {'' if teacher.family == 'ved' else 'accuracy '}{teacher.test_summary}) -> {summary['best_checkpoint']}"
    )
    return summary


def _open_tracking(cfg, teacher: Teacher, workdir: Path, run_dir: Path, uri: str, use_gpu: bool) -> RunTracker:
    tracker = open_run(tracking_uri=uri, experiment=names.DISTILL_EXPERIMENT, run_name=cfg.run_name, run_dir=run_dir, workdir=workdir)
    params = flatten(cfg.model_dump(mode="json"))
    params["resolved.use_gpu"] = str(use_gpu)
    params["resolved.data"] = json.dumps(_data_summary(teacher.data))
    tracker.log_params(params)
    tracker.set_tags({
        names.TAG_TEACHER_PATH: str(teacher.path),
        names.TAG_TEACHER_TEST_ACCURACY: teacher.test_summary,
        names.TAG_RUN_DIR: str(run_dir),
    })
    return tracker


def _data_summary(data: DataSource) -> dict:
    if isinstance(data, CaptionSpec):
        return {"source": "captions", "train_scenes": data.train_scenes, "val_scenes": data.val_scenes,
                "references_per_image": data.references_per_image}
    if isinstance(data, VqaV2Source):
        return {"source": VQA_V2, **{split: files["questions"] for split, files in data.splits.items()}}
    return {"train_scenes": data.train_scenes, "val_scenes": data.val_scenes}


def _fit(
    cfg: DistillJobConfig,
    teacher: Teacher,
    run_dir: str | Path,
    tracker: RunTracker | None,
    use_gpu: bool,
    callbacks: list | None = None,
    local_cluster: bool | None = None,
    importance: dict | None = None,
):
    """Build and fit the TorchTrainer; ``callbacks`` go to its RunConfig (a sweep trial passes Tune's reporter).

    ``run_dir``: the run's directory in the storage, a path or a ``pyarrow.fs`` URI (Ray Train's
    ``storage_path`` is its parent and ``name`` its name); every node must see it.

    ``importance``: the teacher's scores (:func:`pruning_importance`) for a student pruned from it;
    they travel in the loop config, so workers on other nodes need no file of the driver's.

    ``tracker``: rank 0 logs each epoch's metrics to this MLflow run (None: nobody does, as in a sweep
    trial, whose epochs the sweep's driver logs).

    ``local_cluster``: the cluster was started by this job on one machine (default: by this process,
    :func:`pipeline.local_cluster.started_here`); Ray Train's preemption watcher is then left out.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    if local_cluster is None:
        local_cluster = started_here()
    trainer = lean_torch_trainer()(
        train_loop,
        train_loop_config={
            "job": cfg.model_dump(mode="json"),
            "teacher": str(teacher.path),
            "data": teacher.data_dict,
            "run_dir": str(run_dir),
            "tracker": tracker,
            "use_gpu": use_gpu,
            "importance": importance,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            storage_path=storage.parent(run_dir),
            name=storage.name(run_dir),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.checkpoints_to_keep,
                checkpoint_score_attribute=names.selection_metric(teacher.family, cfg.selection_metric),
                checkpoint_score_order=names.SELECTION_MODE,
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
        ),
    )
    with preemption_watcher_env(watch=not local_cluster):
        return trainer.fit()


def _summarise(cfg, teacher: Teacher, run_dir: Path, tracker: RunTracker, result, use_gpu: bool, seconds: float,
               store: storage.Storage, ray_dir: str) -> dict:
    """The run's outcome; checkpoints are locations in the storage (a path, or a URI for a URI storage)."""
    if not result.best_checkpoints:
        raise RuntimeError(f"{ray_dir}: the run finished without a checkpoint")
    # best by the selection metric; ties go to the lower validation loss
    selection = names.selection_metric(teacher.family, cfg.selection_metric)
    checkpoint, best = max(result.best_checkpoints, key=lambda item: (item[1][selection], -item[1][names.VAL_LOSS]))
    returned = result.return_value or {}
    return {
        "run_name": cfg.run_name,
        "family": teacher.family,
        "selection_metric": selection,
        "run_dir": str(run_dir),
        "storage_dir": ray_dir,
        "best_checkpoint": store.location_of(checkpoint.path),
        "best": best,
        "latest": result.metrics,
        "history": returned.get("history", []),
        "checkpoints": [store.location_of(c.path) for c, _ in result.best_checkpoints],
        "teacher": {"path": str(teacher.path), "test_accuracy": teacher.test_accuracy, "test_scores": teacher.test_scores},
        "mlflow": {"tracking_uri": tracker.tracking_uri, "experiment_id": tracker.experiment_id, "run_id": tracker.run_id},
        "num_workers": cfg.scaling.num_workers,
        "use_gpu": use_gpu,
        "seconds": seconds,
    }


# ---------------------------------------------------------------- the worker loop (one per Ray Train worker)


def train_loop(loop_config: dict) -> dict:
    """Ray Train's entry point on each worker: :func:`pipeline.distill_worker.train_loop`.

    Imported here, when a worker calls it: Ray pickles this function by reference, so the process
    that builds the trainer (the CLI driver, a sweep's trial actor) never imports the model stack.
    """
    from pipeline.distill_worker import train_loop as run

    return run(loop_config)
