"""``amad distill``: distil a saved teacher into a smaller student with Ray Train (DDP).

setup (validate against the teacher and the cluster) -> fit (TorchTrainer, one checkpoint per
epoch, resumable) -> cleanup (best checkpoint to MLflow, ``summary.json``).

Runs are resumable by name. Ray Train V2 (2.60) keeps a checkpoint-manager snapshot in
``<workdir>/ray/<run_name>/``; a new ``fit`` with the same ``storage_path`` and ``name`` loads it and
``ray.train.get_checkpoint()`` returns the latest checkpoint, both after a worker failure (within
``max_failures``) and when the same command is run again. The worker loop resumes at the next epoch
with the optimizer, scheduler and step count it saved. Every epoch is seeded from ``(seed, epoch)``
(data order) and ``(seed, epoch, rank)`` (torch RNG), so no RNG state needs saving for a resumed
run to take the same steps as an uninterrupted one.

A checkpoint directory holds the student as ``from_pretrained`` loads it (``config.json``,
``model.safetensors``), ``tokenizer.json``, ``benchmark.json`` (its data spec) and ``train_state.pt``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from amad.data.benchmark import BenchmarkSpec, make_split
from amad.data.dataset import VQASplit
from amad.data.text import TOKENIZER_FILE, load_tokenizer
from amad.models import StudentSpec, get_adapter
from amad.objective import DistillationObjective
from amad.training import make_optimizer, warmup_cosine
from pipeline import names
from pipeline.lean_trainer import lean_torch_trainer, preemption_watcher_env
from pipeline.local_cluster import connected, started_here
from pipeline.config import ConfigError, DistillJobConfig
from pipeline.cpu_allocator import retain_freed_memory
from pipeline.tracking import RunTracker, flatten, open_run, resolve_tracking_uri

TEACHER_FILES = ("config.json", "model.safetensors", TOKENIZER_FILE, names.BENCHMARK_FILE)


# Workers log through logging: Ray Train V2 patches print() in workers and a print shows up twice.
_worker_log = logging.getLogger("amad.distill")


def _log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------- setup: checks before anything runs


@dataclass(frozen=True)
class Teacher:
    """What the driver learns from a teacher directory without loading its weights."""

    path: Path
    layers: int
    benchmark: BenchmarkSpec  # the teacher's spec with the job's size overrides applied
    test_accuracy: float | None


def data_spec(teacher_benchmark: dict, cfg: DistillJobConfig) -> BenchmarkSpec:
    values = dict(teacher_benchmark)
    for key, value in cfg.data.model_dump().items():
        if value is not None:
            values[key] = value
    return BenchmarkSpec.from_dict(values)


def check_job(cfg: DistillJobConfig) -> Teacher:
    """Everything that can be checked from the config and the teacher's small files; ConfigError if not.

    Reads ``config.json``, ``benchmark.json`` and ``metrics.json`` only (no weights, no Ray).
    """
    from transformers import AutoConfig

    path = Path(cfg.teacher).expanduser().resolve()
    missing = [name for name in TEACHER_FILES if not (path / name).is_file()]
    if missing:
        raise ConfigError(f"teacher: {path} is not a teacher directory saved by `amad teacher` (missing {', '.join(missing)})")
    teacher_config = AutoConfig.from_pretrained(str(path))
    try:
        adapter = get_adapter(teacher_config.model_type)
    except ValueError as err:
        raise ConfigError(f"teacher: {err}") from None
    spec = StudentSpec(cfg.student.heads, cfg.student.layers, cfg.student.resolved_head_dim(), cfg.student.intermediate_ratio)
    try:
        student_config = adapter.student_config(teacher_config, spec)
    except ValueError as err:
        raise ConfigError(f"student: {err}") from None
    if cfg.student.init == "teacher":
        try:
            adapter.check_teacher_init(teacher_config, student_config)
        except ValueError as err:
            raise ConfigError(f"student.init: {err}") from None
    teacher_layers, student_layers = teacher_config.num_hidden_layers, student_config.num_hidden_layers
    objective = cfg.objective
    if not isinstance(objective.layer_map, str):
        for s, t in objective.layer_map:
            if not (0 <= s < student_layers and 0 <= t < teacher_layers):
                raise ConfigError(
                    f"objective.layer_map: pair [{s}, {t}] is out of range: the student has {student_layers} layers "
                    f"(student.layers) and the teacher {teacher_layers} ({path}/config.json); indices are 0-based"
                )
    if objective.method == "relation":
        for who, hidden in (("student", student_config.hidden_size), ("teacher", teacher_config.hidden_size)):
            if hidden % objective.relation_heads:
                raise ConfigError(f"objective.relation_heads={objective.relation_heads} does not divide the {who}'s hidden size {hidden}")
    unknown_kinds = set(objective.kinds) - set(adapter.kinds) if objective.method != "none" else set()
    if unknown_kinds:
        raise ConfigError(f"objective.kinds: {sorted(unknown_kinds)} are not attention kinds of {adapter.family} (it has {list(adapter.kinds)})")

    benchmark = data_spec(json.loads((path / names.BENCHMARK_FILE).read_text()), cfg)
    questions = benchmark.train_scenes * benchmark.questions_per_scene
    if questions // cfg.scaling.num_workers < cfg.train.batch_size:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size}: {benchmark.train_scenes} train scenes x {benchmark.questions_per_scene} "
            f"questions over scaling.num_workers={cfg.scaling.num_workers} leave fewer than one batch per worker"
        )
    test_accuracy = None
    metrics_file = path / "metrics.json"
    if metrics_file.is_file():
        test_accuracy = json.loads(metrics_file.read_text()).get("test", {}).get("teacher", {}).get("accuracy")
    return Teacher(path, teacher_layers, benchmark, test_accuracy)


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


def check_resumable(cfg: DistillJobConfig, run_dir: Path) -> None:
    """A run directory of the same name must have been started by the same training settings."""
    job_file = run_dir / names.JOB_FILE
    if not job_file.is_file():
        return
    previous = _fingerprint(json.loads(job_file.read_text()))
    current = _fingerprint(cfg.model_dump(mode="json"))
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
    ``$RAY_ADDRESS``, else starts a local one (and shuts it down at the end). A bad config raises
    :class:`ConfigError` before anything is written under ``workdir``.
    """
    started = time.perf_counter()
    workdir = Path(workdir).resolve()
    teacher = check_job(cfg)
    with connected(address):
        return _run(cfg, teacher, workdir, tracking_uri, started)


def _run(cfg: DistillJobConfig, teacher: "Teacher", workdir: Path, tracking_uri: str | None, started: float) -> dict:
    """:func:`main` once Ray is connected."""
    use_gpu = check_placement(cfg)
    run_dir = workdir / "ray" / cfg.run_name
    check_resumable(cfg, run_dir)
    # -- nothing above writes; from here on the run exists
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / names.JOB_FILE).write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    tracker = _open_tracking(cfg, teacher, workdir, run_dir, resolve_tracking_uri(workdir, tracking_uri), use_gpu)
    try:
        result = _fit(cfg, teacher, run_dir, tracker, use_gpu)
    except BaseException:
        tracker.finish("FAILED")
        raise
    summary = _summarise(cfg, teacher, run_dir, tracker, result, use_gpu, time.perf_counter() - started)
    tracker.log_directory(summary["best_checkpoint"], names.BEST_CHECKPOINT_ARTIFACT, skip=(names.TRAIN_STATE_FILE,))
    tracker.set_tags({names.TAG_BEST_CHECKPOINT: summary["best_checkpoint"]})
    tracker.finish("FINISHED")
    (run_dir / names.SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    best = summary["best"]
    _log(
        f"[{cfg.run_name}] best: epoch {best[names.EPOCH]} val_acc {best[names.VAL_ACCURACY]:.4f} "
        f"(teacher test accuracy {teacher.test_accuracy}) -> {summary['best_checkpoint']}"
    )
    return summary


def _open_tracking(cfg, teacher: Teacher, workdir: Path, run_dir: Path, uri: str, use_gpu: bool) -> RunTracker:
    tracker = open_run(tracking_uri=uri, experiment=names.DISTILL_EXPERIMENT, run_name=cfg.run_name, run_dir=run_dir, workdir=workdir)
    params = flatten(cfg.model_dump(mode="json"))
    params["resolved.use_gpu"] = str(use_gpu)
    params["resolved.data"] = json.dumps({"train_scenes": teacher.benchmark.train_scenes, "val_scenes": teacher.benchmark.val_scenes})
    tracker.log_params(params)
    tracker.set_tags({
        names.TAG_TEACHER_PATH: str(teacher.path),
        names.TAG_TEACHER_TEST_ACCURACY: "unknown" if teacher.test_accuracy is None else f"{teacher.test_accuracy:.6f}",
        names.TAG_RUN_DIR: str(run_dir),
    })
    return tracker


def _fit(
    cfg: DistillJobConfig,
    teacher: Teacher,
    run_dir: Path,
    tracker: RunTracker | None,
    use_gpu: bool,
    callbacks: list | None = None,
    local_cluster: bool | None = None,
):
    """Build and fit the TorchTrainer; ``callbacks`` go to its RunConfig (a sweep trial passes Tune's reporter).

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
            "benchmark": teacher.benchmark.to_dict(),
            "run_dir": str(run_dir),
            "tracker": tracker,
            "use_gpu": use_gpu,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            storage_path=str(run_dir.parent),
            name=run_dir.name,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.checkpoints_to_keep,
                checkpoint_score_attribute=names.SELECTION_METRIC,
                checkpoint_score_order=names.SELECTION_MODE,
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
        ),
    )
    with preemption_watcher_env(watch=not local_cluster):
        return trainer.fit()


def _summarise(cfg, teacher: Teacher, run_dir: Path, tracker: RunTracker, result, use_gpu: bool, seconds: float) -> dict:
    if not result.best_checkpoints:
        raise RuntimeError(f"{run_dir}: the run finished without a checkpoint")
    # best by the selection metric; ties go to the lower validation loss
    checkpoint, best = max(result.best_checkpoints, key=lambda item: (item[1][names.SELECTION_METRIC], -item[1][names.VAL_LOSS]))
    returned = result.return_value or {}
    return {
        "run_name": cfg.run_name,
        "run_dir": str(run_dir),
        "best_checkpoint": checkpoint.path,
        "best": best,
        "latest": result.metrics,
        "history": returned.get("history", []),
        "checkpoints": [c.path for c, _ in result.best_checkpoints],
        "teacher": {"path": str(teacher.path), "test_accuracy": teacher.test_accuracy},
        "mlflow": {"tracking_uri": tracker.tracking_uri, "experiment_id": tracker.experiment_id, "run_id": tracker.run_id},
        "num_workers": cfg.scaling.num_workers,
        "use_gpu": use_gpu,
        "seconds": seconds,
    }


# ---------------------------------------------------------------- the worker loop (one per Ray Train worker)


class _ThroughDDP:
    """Calls go through the DDP wrapper (gradient sync); attribute reads reach the model itself.

    Model adapters read model internals (``model.vilt.embeddings``) that DDP does not expose.
    """

    def __init__(self, prepared: nn.Module, module: nn.Module):
        self._prepared, self._module = prepared, module

    def __call__(self, *args, **kwargs):
        return self._prepared(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._module, name)


def _epoch_seed(seed: int, epoch: int, rank: int | None = None) -> int:
    return (seed * 1_000_003 + epoch) * 1_009 + (0 if rank is None else rank + 1)


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(values: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(values, op=op)
    return values


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@torch.no_grad()
def validate(model: nn.Module, adapter, split: VQASplit, rank: int, world: int, batch_size: int, device: torch.device) -> dict[str, float]:
    """Accuracy and mean cross-entropy over the WHOLE ``split``: each worker evaluates every
    ``world``-th question from ``rank`` and the counts are summed across workers.

    Runs in fp32 on the unwrapped model (no DDP collectives per batch, and the figures are the ones
    ``amad.training.evaluate`` gives for the saved student).
    """
    qtypes = len(split.qtypes)
    shard = split.subset(torch.arange(rank, len(split), world))
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    correct = torch.zeros(qtypes, dtype=torch.float64, device=device)  # per question type
    count = torch.zeros(qtypes, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for batch in shard.batches(batch_size):
        batch = _to(batch, device)
        logits = adapter.forward(model, batch, need_attentions=False).logits.float()  # (B, answers)
        loss_sum += nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").double()
        hit = logits.argmax(dim=-1) == batch["labels"]
        correct += torch.bincount(batch["qtype"][hit], minlength=qtypes).double()
        count += torch.bincount(batch["qtype"], minlength=qtypes).double()
    model.train(was_training)
    totals = _all_reduce(torch.cat([loss_sum, correct, count]))
    loss_sum, correct, count = totals[0], totals[1 : 1 + qtypes], totals[1 + qtypes :]
    relational = torch.tensor([name in split.relational_qtypes for name in split.qtypes], device=device)
    return {
        names.VAL_ACCURACY: (correct.sum() / count.sum()).item(),
        names.VAL_RELATIONAL_ACCURACY: (correct[relational].sum() / count[relational].sum().clamp(min=1)).item(),
        names.VAL_LOSS: (loss_sum / count.sum()).item(),
    }


def train_loop(loop_config: dict) -> dict:
    """One Ray Train worker: DDP-train the student against the frozen teacher, one report per epoch."""
    import ray.train
    import ray.train.torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per from_pretrained/save_pretrained: noise in Ray logs
    cfg = DistillJobConfig.model_validate(loop_config["job"])
    teacher_path, run_dir = Path(loop_config["teacher"]), Path(loop_config["run_dir"])
    tracker: RunTracker | None = loop_config["tracker"]  # None in a sweep trial: the sweep's driver logs its epochs
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(cfg.scaling.threads_per_worker)
    if cfg.scaling.retain_freed_memory:
        retain_freed_memory()
    device = ray.train.torch.get_device()
    use_amp = loop_config["use_gpu"] and cfg.scaling.precision != "fp32"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.scaling.precision)

    # setup: data, teacher, student, objective, optimizer
    spec = BenchmarkSpec.from_dict(loop_config["benchmark"])
    tokenizer = load_tokenizer(teacher_path)
    train, val = make_split(spec, "train", tokenizer), make_split(spec, "val", tokenizer)
    per_worker = len(train) // world
    steps_per_epoch = per_worker // cfg.train.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{len(train)} train questions over {world} workers give no batch of {cfg.train.batch_size}")
    total_steps = cfg.train.epochs * steps_per_epoch

    adapter = get_adapter(json.loads((teacher_path / "config.json").read_text())["model_type"])
    teacher = adapter.load(teacher_path).eval().requires_grad_(False).to(device)
    student_spec = StudentSpec(cfg.student.heads, cfg.student.layers, cfg.student.resolved_head_dim(), cfg.student.intermediate_ratio)
    student = adapter.build(adapter.student_config(teacher.config, student_spec), seed=cfg.seed)
    if cfg.student.init == "teacher":  # a resumed run overwrites this with its checkpoint below
        adapter.init_from_teacher(student, teacher)
    objective = DistillationObjective(**cfg.objective.kwargs())
    need_maps = cfg.objective.method not in ("none", "relation")

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            student.load_state_dict(adapter.load(directory).state_dict())
            state = torch.load(Path(directory) / names.TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
    prepared = ray.train.torch.prepare_model(student)  # moves to device; DDP when world > 1
    model = _ThroughDDP(prepared, student)
    optimizer = make_optimizer(student, cfg.train.lr, cfg.train.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, cfg.train.warmup_steps, total_steps, cfg.train.min_lr_ratio)
    )
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    start_epoch, step, history = 0, 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step, history = state["epoch"], state["step"], state["history"]
        if rank == 0:
            _worker_log.info(f"[{cfg.run_name}] resumed after epoch {start_epoch} (step {step})")
            if tracker is not None:
                _backfill(tracker, history)

    for epoch in range(start_epoch, cfg.train.epochs):
        torch.manual_seed(_epoch_seed(cfg.seed, epoch, rank))  # dropout etc.: same per (epoch, rank) on resume
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch)))
        shard = order[rank::world][:per_worker]  # (per_worker,) the same length on every worker
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, task, logit_kd, attention
        _barrier()  # start the clock together: rank 0 arrives late after writing the last checkpoint
        tick = time.perf_counter()
        for index in range(steps_per_epoch):
            batch = _to(train.batch(shard[index * cfg.train.batch_size : (index + 1) * cfg.train.batch_size]), device)
            autocast = torch.autocast("cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext()
            with autocast:
                with torch.no_grad():
                    teacher_out = adapter.forward(teacher, batch, need_attentions=need_maps, need_qkv=objective.needs_qkv)
                student_out = adapter.forward(model, batch, need_attentions=need_maps, need_qkv=objective.needs_qkv)
                parts = objective(teacher_out, student_out, batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(parts["loss"]).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(student.parameters(), cfg.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            step += 1
            sums += torch.stack([parts[k].detach().double() for k in ("loss", "task", "logit_kd", "attention")])
            if cfg.fail_at_step == step and rank == 0:
                _fail_once(run_dir, step, committed=f"epoch_{epoch:04d}" if epoch else None)
        # the epoch lasts until its slowest worker is done: every rank reports the same seconds and samples/s
        seconds = _all_reduce(torch.tensor([time.perf_counter() - tick], dtype=torch.float64, device=device), dist.ReduceOp.MAX).item()
        sums = _all_reduce(sums) / (steps_per_epoch * world)
        metrics = {
            names.EPOCH: epoch + 1,
            names.STEP: step,
            names.LR: schedule.get_last_lr()[0],
            names.TRAIN_LOSS: sums[0].item(),
            names.TRAIN_TASK_LOSS: sums[1].item(),
            names.TRAIN_LOGIT_KD_LOSS: sums[2].item(),
            names.TRAIN_ATTENTION_LOSS: sums[3].item(),
            **validate(student, adapter, val, rank, world, cfg.eval_batch_size, device),
            names.SAMPLES_PER_S: steps_per_epoch * cfg.train.batch_size * world / seconds,
            names.EPOCH_SECONDS: seconds,
        }
        history.append(metrics)
        state = {
            "epoch": epoch + 1, "step": step, "history": history, "world_size": world,
            "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
        }
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:  # every worker reports (it is a barrier); only rank 0 writes the checkpoint
                _write_checkpoint(Path(directory), student, teacher_path, spec, state)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch + 1:04d}")
        if rank == 0 and tracker is not None:
            tracker.log_metrics(metrics, step=epoch + 1)
            _worker_log.info(
                f"[{cfg.run_name}] epoch {epoch + 1}/{cfg.train.epochs}  step {step}  train_loss {metrics[names.TRAIN_LOSS]:.4f}  "
                f"val_acc {metrics[names.VAL_ACCURACY]:.4f}  val_loss {metrics[names.VAL_LOSS]:.4f}  "
                f"{metrics[names.SAMPLES_PER_S]:.0f} samples/s"
            )
    return {"history": history, "step": step}


def _write_checkpoint(directory: Path, student: nn.Module, teacher_path: Path, spec: BenchmarkSpec, state: dict) -> None:
    student.save_pretrained(directory)
    shutil.copy(teacher_path / TOKENIZER_FILE, directory / TOKENIZER_FILE)
    (directory / names.BENCHMARK_FILE).write_text(json.dumps(spec.to_dict(), indent=2))
    torch.save(state, directory / names.TRAIN_STATE_FILE)


def _backfill(tracker: RunTracker, history: list[dict]) -> None:
    """Log epochs a crashed attempt reported to Ray but not to MLflow."""
    logged = tracker.logged_steps(names.VAL_ACCURACY)
    for metrics in history:
        if metrics[names.EPOCH] not in logged:
            tracker.log_metrics(metrics, step=metrics[names.EPOCH])


def _fail_once(run_dir: Path, step: int, committed: str | None, timeout_s: float = 300.0) -> None:
    """TEST-ONLY (``fail_at_step``): kill this worker process once, as a crash would.

    First waits until Ray has committed checkpoint ``committed`` (the previous epoch's; None: none yet)
    to the run's ``checkpoint_manager_snapshot.json``. Ray Train's controller collects a report only
    when it next polls the workers (every ~2 s): a worker that dies before then loses that report, and
    the run restarts from the checkpoint before it. Waiting makes the injected fault land where the
    test expects it, after the latest checkpoint, whatever the machine's load.
    """
    marker = run_dir / f".fail_at_step_{step}"
    if marker.exists():
        return
    marker.touch()
    deadline = time.monotonic() + timeout_s
    while committed is not None and _latest_committed(run_dir) != committed:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fail_at_step={step}: checkpoint {committed} not committed to {run_dir} within {timeout_s:g} s")
        time.sleep(0.2)
    _worker_log.warning(f"fail_at_step={step}: worker exiting on purpose (test-only fault injection)")
    os._exit(1)


def _latest_committed(run_dir: Path) -> str | None:
    """The directory name of the latest checkpoint in Ray Train's snapshot of the run (None if none or mid-write)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except (OSError, ValueError):
        return None
