"""``amad teacher``: train a ViLT teacher on the built-in benchmark and prove it uses the image.

setup -> train (resumable) -> baselines (question-only model, per-type answer prior) -> save.

The saved directory loads with ``ViltAdapter.load`` (``from_pretrained``) and holds everything a
later job needs: ``config.json``, ``model.safetensors``, ``tokenizer.json``, ``benchmark.json`` (the
data spec it was trained on), ``metrics.json`` (the accuracy table) and ``teacher.yaml`` (the job
config that produced it).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from amad.data.benchmark import benchmark_tokenizer, make_split
from amad.data.dataset import VQASplit
from amad.data.text import save_tokenizer
from amad.models import get_adapter
from amad.training import accuracy_report, answer_prior_predictions, evaluate, make_optimizer, warmup_cosine
from pipeline.config import TeacherJobConfig

CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"  # beside the checkpoint: the best weights so far (train_model's keep_best)
METRICS_FILE = "metrics.json"
BENCHMARK_FILE = "benchmark.json"
JOB_CONFIG_FILE = "teacher.yaml"
LOG_FILE = "training_log.jsonl"


def _log(message: str) -> None:
    print(message, flush=True)


def build_model(cfg: TeacherJobConfig, answers: tuple[str, ...], vocab_size: int, seed: int) -> nn.Module:
    adapter = get_adapter(cfg.model.family)
    config = adapter.teacher_config(
        vocab_size=vocab_size,
        answers=answers,
        image_size=cfg.data.scene.image_size,
        patch_size=cfg.model.patch_size,
        max_text_length=cfg.data.max_question_length,
        hidden_size=cfg.model.hidden_size,
        heads=cfg.model.heads,
        layers=cfg.model.layers,
        intermediate_size=cfg.model.intermediate_size,
        initializer_range=cfg.model.initializer_range,
        dropout=cfg.model.dropout,
    )
    return adapter.build(config, seed=seed)


def train_model(
    cfg: TeacherJobConfig,
    model: nn.Module,
    train: VQASplit,
    val: VQASplit,
    *,
    steps: int,
    blank_images: bool,
    checkpoint_dir: Path | None,
    name: str,
    step_loss=None,
    validate=None,
    keep_best: str | None = None,
) -> list[dict]:
    """Train ``model`` in place for ``steps`` optimizer steps; returns the evaluation log.

    With ``checkpoint_dir``, state is saved at every evaluation and an existing checkpoint for the
    same config is resumed (so an interrupted multi-hour CPU run loses at most ``eval_every`` steps).
    A resumed run takes the steps an uninterrupted one takes: the checkpoint holds the data
    generator as it was when the current epoch's order was drawn and how many of that epoch's
    batches are done, so the epoch is redrawn and continued rather than replaced by a new order.

    ``step_loss(model, batch)`` and ``validate(model, blank_images) -> dict`` (with ``val_loss`` and a
    ``line`` to log) replace the VQA loss and validation for another task (captioning's
    :mod:`pipeline.train_captioner`); ``train``/``val`` then only need ``batches``.

    ``keep_best`` (a key of the validation entries, higher is better): the model ends with the weights of the
    evaluation that scored highest on it, not the last step's. The best weights are saved beside the
    checkpoint as they appear (``best.pt``), so a resumed run keeps them; the chosen step is marked
    ``"kept": true`` in the returned log.
    """
    adapter = get_adapter(cfg.model.family)
    opt_cfg = cfg.train
    optimizer = make_optimizer(model, opt_cfg.lr, opt_cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, opt_cfg.warmup_steps, steps, opt_cfg.min_lr_ratio)
    )
    generator = torch.Generator().manual_seed(opt_cfg.seed)
    # The generator before the current epoch's order was drawn, and the batches of it already done.
    epoch_start, epoch_done = generator.get_state(), 0
    step, history = 0, []
    checkpoint = checkpoint_dir / CHECKPOINT_FILE if checkpoint_dir else None
    fingerprint = cfg.model_dump_json()
    if checkpoint and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        if state["config"] == fingerprint:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            generator.set_state(state["generator"])
            # Checkpoints from before these keys resume with a fresh epoch order.
            epoch_start = state.get("epoch_generator", generator.get_state())
            epoch_done = state.get("epoch_batches", 0)
            if "torch_rng" in state:  # dropout draws from the global generator
                torch.set_rng_state(state["torch_rng"])
            step, history = state["step"], state["history"]
            _log(f"[{name}] resumed from {checkpoint} at step {step}/{steps}")
        else:
            _log(f"[{name}] ignoring {checkpoint}: it was written for a different config")

    model.train()
    started, seen, running_loss = time.perf_counter(), 0, 0.0
    best_state, best_step = None, None  # keep_best: the best weights seen by this process, and their step
    while step < steps:
        generator.set_state(epoch_start)
        epoch = train.batches(opt_cfg.batch_size, shuffle=True, generator=generator, drop_last=True)
        for batch in itertools.islice(epoch, epoch_done, None):
            if blank_images:
                batch["pixel_values"] = torch.zeros_like(batch["pixel_values"])
            if step_loss is not None:
                loss = step_loss(model, batch)
            else:
                logits = adapter.forward(model, batch, need_attentions=False).logits
                loss = nn.functional.cross_entropy(logits, batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.grad_clip)
            optimizer.step()
            schedule.step()
            step += 1
            epoch_done += 1
            seen += batch["labels"].shape[0]
            running_loss += loss.item()
            if step % cfg.eval_every == 0 or step == steps:
                elapsed = time.perf_counter() - started
                entry = {"step": step, "train_loss": running_loss / max(1, step - (history[-1]["step"] if history else 0))}
                if validate is not None:
                    found = validate(model, blank_images)
                    line = found.pop("line")
                    entry.update(found)
                else:
                    report = evaluate(model, adapter, val, cfg.eval_batch_size, blank_images)
                    entry.update(val_loss=report["loss"], val_accuracy=report["accuracy"], val_relational_accuracy=report.get("relational_accuracy"))
                    line = f"val_acc {entry['val_accuracy']:.3f} (relational {entry['val_relational_accuracy']:.3f})"
                entry.update(samples_per_s=seen / elapsed, lr=schedule.get_last_lr()[0])
                history.append(entry)
                eta = (steps - step) * opt_cfg.batch_size / max(entry["samples_per_s"], 1e-9)
                _log(
                    f"[{name}] step {step}/{steps}  train_loss {entry['train_loss']:.3f}  {line}  "
                    f"{entry['samples_per_s']:.0f} ex/s  eta {eta / 60:.1f} min"
                )
                running_loss = 0.0
                model.train()
                if keep_best is not None and entry[keep_best] > max((h[keep_best] for h in history[:-1]), default=float("-inf")):
                    best_state, best_step = {key: value.detach().clone() for key, value in model.state_dict().items()}, step
                    if checkpoint:
                        _save_atomically({"step": step, "model": best_state, "config": fingerprint}, checkpoint.with_name(BEST_FILE))
                if checkpoint:
                    _save_checkpoint(
                        checkpoint, model, optimizer, schedule, generator, step, history, fingerprint,
                        epoch=(epoch_start, epoch_done),
                    )
            if step >= steps:
                break
        else:  # the epoch ran out: the next one's order is drawn from where this one's left it
            epoch_start, epoch_done = generator.get_state(), 0
    if keep_best is not None and history:
        best = max(range(len(history)), key=lambda i: (history[i][keep_best], -i))  # the first of equal scores
        if best != len(history) - 1:
            if best_step != history[best]["step"]:  # found before this process resumed: read it back
                saved = torch.load(checkpoint.with_name(BEST_FILE), weights_only=False) if checkpoint else None
                if not saved or saved["step"] != history[best]["step"] or saved["config"] != fingerprint:
                    raise RuntimeError(f"[{name}] the weights of the best step ({history[best]['step']}) are not in "
                                       f"{checkpoint.with_name(BEST_FILE) if checkpoint else '(no checkpoint directory)'}")
                best_state = saved["model"]
            model.load_state_dict(best_state)
        history[best]["kept"] = True
        _log(f"[{name}] keeping the weights of step {history[best]['step']} (best {keep_best} {history[best][keep_best]:.4f})")
    return history


def _save_atomically(state: dict, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a kill mid-write never leaves a corrupt file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def _save_checkpoint(path: Path, model, optimizer, schedule, generator, step, history, fingerprint, *, epoch) -> None:
    """Write to a temporary file then rename, so a kill mid-write never leaves a corrupt checkpoint.

    ``epoch``: ``(generator state before the epoch's order was drawn, batches of it done)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "generator": generator.get_state(),
            "epoch_generator": epoch[0],
            "epoch_batches": epoch[1],
            "torch_rng": torch.get_rng_state(),
            "step": step,
            "history": history,
            "config": fingerprint,
        },
        partial,
    )
    os.replace(partial, path)


def accuracy_table(rows: dict[str, dict[str, float]], qtypes: tuple[str, ...]) -> str:
    """A Markdown table: one column per model, one row per metric (percent)."""
    names = list(rows)
    keys = ["accuracy", "relational_accuracy", "nonrelational_accuracy", *(f"acc/{q}" for q in qtypes)]
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in keys:
        cells = [f"{100 * rows[n][key]:.1f}" if key in rows[n] else "-" for n in names]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(cfg: TeacherJobConfig, workdir: str | Path, output_dir: str | Path | None = None) -> dict:
    """Train the teacher and its baselines; returns the metrics written to ``metrics.json``."""
    workdir = Path(workdir)
    output = Path(output_dir) if output_dir else workdir / "teacher"
    scratch = workdir / "teacher-train"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()

    # setup
    spec = cfg.data.benchmark_spec()
    tokenizer = benchmark_tokenizer()
    splits = {name: make_split(spec, name, tokenizer) for name in ("train", "val", "test")}
    _log(
        f"data: {len(splits['train'])} train / {len(splits['val'])} val / {len(splits['test'])} test questions, "
        f"{spec.scene.image_size}px images, {len(splits['train'].answers)} answers"
    )
    answers, vocab = splits["train"].answers, tokenizer.get_vocab_size()
    adapter = get_adapter(cfg.model.family)

    # train the teacher (resumable)
    teacher = build_model(cfg, answers, vocab, seed=cfg.train.seed)
    params = sum(p.numel() for p in teacher.parameters())
    _log(f"teacher: {cfg.model.layers} layers x {cfg.model.heads} heads, hidden {cfg.model.hidden_size}, {params / 1e6:.2f}M parameters")
    history = train_model(
        cfg, teacher, splits["train"], splits["val"], steps=cfg.train.steps, blank_images=False,
        checkpoint_dir=scratch / "teacher", name="teacher",
    )
    teacher_seconds = time.perf_counter() - started

    # baselines on the test split
    results = {"teacher": evaluate(teacher, adapter, splits["test"], cfg.eval_batch_size)}
    if cfg.blind_steps:
        blind = build_model(cfg, answers, vocab, seed=cfg.train.seed)
        train_model(
            cfg, blind, splits["train"], splits["val"], steps=cfg.blind_steps, blank_images=True,
            checkpoint_dir=scratch / "blind", name="question-only",
        )
        results["question_only"] = evaluate(blind, adapter, splits["test"], cfg.eval_batch_size, blank_images=True)
    results["answer_prior"] = accuracy_report(answer_prior_predictions(splits["train"], splits["test"]), splits["test"])

    strongest_blind = max((r for n, r in results.items() if n != "teacher"), key=lambda r: r["accuracy"])
    gap = results["teacher"]["accuracy"] - strongest_blind["accuracy"]
    gap_relational = results["teacher"]["relational_accuracy"] - max(
        r["relational_accuracy"] for n, r in results.items() if n != "teacher"
    )
    metrics = {
        "test": results,
        "gap_vs_best_blind": gap,
        "relational_gap_vs_best_blind": gap_relational,
        "uses_image": bool(gap >= 0.20 and gap_relational >= 0.20),
        "parameters": params,
        "train_seconds": teacher_seconds,
        "total_seconds": time.perf_counter() - started,
        "history": history,
        "torch_threads": torch.get_num_threads(),
    }

    # save: a directory from_pretrained loads, plus what a later job needs to use it
    output.mkdir(parents=True, exist_ok=True)
    teacher.save_pretrained(output)
    save_tokenizer(tokenizer, output)
    (output / BENCHMARK_FILE).write_text(json.dumps(spec.to_dict(), indent=2))
    (output / JOB_CONFIG_FILE).write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    (output / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    table = accuracy_table(results, splits["test"].qtypes)
    (output / "accuracy.md").write_text(table + "\n")
    shutil.rmtree(scratch, ignore_errors=True)

    _log("\ntest accuracy (%):\n" + table)
    _log(
        f"\nteacher vs best blind baseline: {100 * gap:+.1f} points overall, {100 * gap_relational:+.1f} relational"
        f" ({'uses the image' if metrics['uses_image'] else 'WARNING: below the 20-point bar'})"
    )
    _log(f"saved to {output} ({teacher_seconds / 60:.1f} min training)")
    return metrics


def save_untrained(cfg: TeacherJobConfig, directory: str | Path, seed: int = 0) -> Path:
    """A randomly initialised teacher of ``cfg``'s shape, saved as :func:`main` saves a trained one
    (weights, config, tokenizer, ``benchmark.json``): for smoke runs that need a teacher directory."""
    directory = Path(directory)
    spec = cfg.data.benchmark_spec()
    tokenizer = benchmark_tokenizer()
    model = build_model(cfg, make_split(spec, "val", tokenizer).answers, tokenizer.get_vocab_size(), seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    (directory / BENCHMARK_FILE).write_text(json.dumps(spec.to_dict(), indent=2))
    return directory
