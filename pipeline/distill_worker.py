"""The Ray Train worker side of ``amad distill``: one :func:`train_loop` per worker (DDP).

Imported only by the workers (through :func:`pipeline.train_distill.train_loop`): the processes that
only start a run -- the CLI driver, a sweep's trial actor -- never pay for the model stack
(transformers) imported here.

Each epoch is seeded from ``(seed, epoch)`` (data order) and ``(seed, epoch, rank)`` (torch RNG), so a
resumed run takes the same steps as an uninterrupted one; the checkpoint holds the student as
``from_pretrained`` loads it, ``tokenizer.json``, the data spec (``benchmark.json``, a captioner's
``captions.json``) and ``train_state.pt``. What differs per model family (data, validation, the new
student) is the task's (:mod:`pipeline.distill_tasks`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from amad.models import get_adapter
from amad.objective import DistillationObjective
from amad.training import make_optimizer, warmup_cosine
from pipeline import names, storage
from pipeline.config import DistillJobConfig
from pipeline.cpu_allocator import retain_freed_memory
from pipeline.distill_tasks import _all_reduce, _distributed, _to, task_for
from pipeline.tracking import RunTracker

# Workers log through logging: Ray Train V2 patches print() in workers and a print shows up twice.
_worker_log = logging.getLogger("amad.distill")




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


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def train_loop(loop_config: dict) -> dict:
    """One Ray Train worker: DDP-train the student against the frozen teacher, one report per epoch."""
    import ray.train
    import ray.train.torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per from_pretrained/save_pretrained: noise in Ray logs
    cfg = DistillJobConfig.model_validate(loop_config["job"])
    teacher_path, run_dir = Path(loop_config["teacher"]), loop_config["run_dir"]  # run_dir: in the storage, a path or a URI
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
    adapter = get_adapter(json.loads((teacher_path / "config.json").read_text())["model_type"])
    task = task_for(adapter.family, cfg, teacher_path, loop_config["data"])
    selection = names.selection_metric(adapter.family, cfg.selection_metric)
    train = task.train
    per_worker = len(train) // world
    steps_per_epoch = per_worker // cfg.train.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{len(train)} training examples over {world} workers give no batch of {cfg.train.batch_size}")
    total_steps = cfg.train.epochs * steps_per_epoch

    teacher = adapter.load(teacher_path).eval().requires_grad_(False).to(device)
    target_key = task.target_key
    need_maps = cfg.objective.method not in ("none", "relation")

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # the saved config rebuilds the student's shapes, pruned or not
        with checkpoint.as_directory() as directory:
            student = adapter.load(directory).to(device).train()
            state = torch.load(Path(directory) / names.TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
    else:
        student = task.new_student(cfg, adapter, teacher, loop_config.get("importance")).to(device).train()
    # one-to-one by origin reads the student's pruning record (kept in its saved config on resume)
    origins = task.origins(student) if cfg.objective.one_to_one_pairing == "origin" else None
    objective = DistillationObjective(**cfg.objective.kwargs(origins))
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
                parts = objective(teacher_out, student_out, batch[target_key])
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
            **task.validate(student, adapter, rank, world, cfg.eval_batch_size, device),
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
                _write_checkpoint(Path(directory), student, task, state)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch + 1:04d}")
        if rank == 0:
            if tracker is not None:
                tracker.log_metrics(metrics, step=epoch + 1)
            _worker_log.info(
                f"[{cfg.run_name}] epoch {epoch + 1}/{cfg.train.epochs}  step {step}  train_loss {metrics[names.TRAIN_LOSS]:.4f}  "
                f"{selection} {metrics[selection]:.4f}  val_loss {metrics[names.VAL_LOSS]:.4f}  "
                f"{metrics[names.SAMPLES_PER_S]:.0f} samples/s"
            )
    return {"history": history, "step": step}


def _write_checkpoint(directory: Path, student: nn.Module, task, state: dict) -> None:
    """The student as ``from_pretrained`` loads it, the task's files (pre-processing, data spec), the train state."""
    student.save_pretrained(directory)
    task.write_files(directory)
    torch.save(state, directory / names.TRAIN_STATE_FILE)


def _backfill(tracker: RunTracker, history: list[dict]) -> None:
    """Log epochs a crashed attempt reported to Ray but not to MLflow."""
    logged = tracker.logged_steps(names.VAL_LOSS)  # every family reports it
    for metrics in history:
        if metrics[names.EPOCH] not in logged:
            tracker.log_metrics(metrics, step=metrics[names.EPOCH])


def _fail_once(run_dir: str, step: int, committed: str | None, timeout_s: float = 300.0) -> None:
    """TEST-ONLY (``fail_at_step``): kill this worker process once, as a crash would.

    First waits until Ray has committed checkpoint ``committed`` (the previous epoch's; None: none yet)
    to the run's ``checkpoint_manager_snapshot.json``. Ray Train's controller collects a report only
    when it next polls the workers (every ~2 s): a worker that dies before then loses that report, and
    the run restarts from the checkpoint before it. Waiting makes the injected fault land where the
    test expects it, after the latest checkpoint, whatever the machine's load.
    """
    marker = storage.join(run_dir, f".fail_at_step_{step}")  # in the run's storage: the restarted worker may be on another node
    if storage.is_file(marker):
        return
    storage.write_text(marker, "")
    deadline = time.monotonic() + timeout_s
    while committed is not None and _latest_committed(run_dir) != committed:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fail_at_step={step}: checkpoint {committed} not committed to {run_dir} within {timeout_s:g} s")
        time.sleep(0.2)
    _worker_log.warning(f"fail_at_step={step}: worker exiting on purpose (test-only fault injection)")
    os._exit(1)


def _latest_committed(run_dir: str) -> str | None:
    """The directory name of the latest checkpoint in Ray Train's snapshot of the run (None if none or mid-write)."""
    try:
        snapshot = json.loads(storage.read_text(storage.join(run_dir, "checkpoint_manager_snapshot.json")))
        return (snapshot.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    except (OSError, ValueError):
        return None
