"""``amad teacher`` for ``model.family: ved``: train a captioning teacher and show it uses the image.

setup -> train (resumable, as the VQA teacher: :func:`pipeline.train_teacher.train_model`; ``keep: best``, the
default, ends with the weights of the evaluation with the highest validation CIDEr-D) -> a text-only
baseline (kept by the same rule) (the same decoder trained and evaluated with every image blanked) -> test scores (greedy and beam
search) -> save.

The saved directory loads with :meth:`amad.models_ved.VedAdapter.load` and holds ``config.json``,
``model.safetensors``, ``tokenizer.json``, ``captions.json`` (the data spec), ``metrics.json``,
``scores.md`` (the table) and ``teacher.yaml`` (the job that produced it).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from amad.captioning import caption_report, teacher_forced_loss
from amad.data.captions import CaptionSplit, caption_tokenizer, caption_training_set, make_caption_split
from amad.data.text import CLS, PAD, SEP, save_tokenizer
from amad.metrics import METRIC_KEYS
from amad.models_ved import VedAdapter
from pipeline.config import CaptionTeacherJobConfig
from pipeline.train_teacher import JOB_CONFIG_FILE, METRICS_FILE, train_model

CAPTIONS_FILE = "captions.json"
SCORES_FILE = "scores.md"
VAL_DECODE_IMAGES = 200  # validation images decoded (greedy) at every evaluation
# The teacher "uses the image" when its greedy CIDEr-D is at least this many times the text-only decoder's.
USES_IMAGE_RATIO = 2.0


def _log(message: str) -> None:
    print(message, flush=True)


def build_captioner(cfg: CaptionTeacherJobConfig, seed: int) -> nn.Module:
    tokenizer = caption_tokenizer()
    config = VedAdapter.teacher_config(
        vocab_size=tokenizer.get_vocab_size(), image_size=cfg.data.scene.image_size, patch_size=cfg.model.patch_size,
        max_caption_length=cfg.data.caption_spec().max_caption_length, pad_token_id=tokenizer.token_to_id(PAD),
        bos_token_id=tokenizer.token_to_id(CLS), eos_token_id=tokenizer.token_to_id(SEP), hidden_size=cfg.model.hidden_size,
        heads=cfg.model.heads, layers=cfg.model.layers, decoder_layers=cfg.model.decoder_layers,
        intermediate_size=cfg.model.intermediate_size, dropout=cfg.model.dropout)
    return VedAdapter.build(config, seed=seed)


def _token_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = VedAdapter.forward(model, batch, need_attentions=False).logits
    return nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)


def _subset(split: CaptionSplit, images: int) -> CaptionSplit:
    return CaptionSplit(split.images[:images], split.references[:images], split.image_ids[:images])


def scores_table(rows: dict[str, dict]) -> str:
    """Markdown: one column per model/decoding, one row per metric (BLEU and ROUGE-L x100, CIDEr-D as COCO reports it)."""
    names = list(rows)
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in METRIC_KEYS:
        scale = 1 if key == "cider_d" else 100
        lines.append(f"| {key} | " + " | ".join(f"{scale * rows[n][key]:.2f}" for n in names) + " |")
    return "\n".join(lines)


def main(cfg: CaptionTeacherJobConfig, workdir: str | Path, output_dir: str | Path | None = None) -> dict:
    """Train the captioning teacher and its text-only baseline; returns what ``metrics.json`` holds."""
    workdir = Path(workdir)
    output = Path(output_dir) if output_dir else workdir / "teacher"
    scratch = workdir / "teacher-train"
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    spec = cfg.data.caption_spec()
    tokenizer = caption_tokenizer()
    splits = {name: make_caption_split(spec, name) for name in ("train", "val", "test")}
    train = caption_training_set(splits["train"], tokenizer, spec.max_caption_length)
    val_pairs = caption_training_set(splits["val"], tokenizer, spec.max_caption_length)
    val_decode = _subset(splits["val"], VAL_DECODE_IMAGES)
    _log(f"data: {len(splits['train'])} train images x {spec.references_per_image} captions = {len(train)} pairs; "
         f"{len(splits['val'])} val / {len(splits['test'])} test images; vocabulary {tokenizer.get_vocab_size()} tokens")

    def validate(model: nn.Module, blank_images: bool) -> dict:
        scores = caption_report(model, val_decode, tokenizer, max_length=spec.max_caption_length, batch_size=cfg.eval_batch_size,
                                blank_images=blank_images)
        loss = teacher_forced_loss(model, val_pairs, cfg.eval_batch_size, blank_images)
        return {"val_loss": loss, "val_cider_d": scores["cider_d"], "val_bleu_4": scores["bleu_4"],
                "line": f"val_loss {loss:.3f}  val CIDEr-D {scores['cider_d']:.3f}  BLEU-4 {scores['bleu_4']:.3f}"}

    teacher = build_captioner(cfg, seed=cfg.train.seed)
    params = sum(p.numel() for p in teacher.parameters())
    layers = f"{cfg.model.layers}+{cfg.model.decoder_layers or cfg.model.layers}"
    _log(f"teacher: {layers} layers (encoder+decoder) x {cfg.model.heads} heads, hidden {cfg.model.hidden_size}, {params / 1e6:.2f}M parameters")
    keep_best = "val_cider_d" if cfg.keep == "best" else None
    history = train_model(cfg, teacher, train, None, steps=cfg.train.steps, blank_images=False, checkpoint_dir=scratch / "teacher",
                          name="teacher", step_loss=_token_loss, validate=validate, keep_best=keep_best)
    teacher_seconds = time.perf_counter() - started

    decode = dict(max_length=spec.max_caption_length, batch_size=cfg.eval_batch_size)
    results = {"teacher_greedy": caption_report(teacher, splits["test"], tokenizer, **decode)}
    if cfg.num_beams > 1:
        results[f"teacher_beam{cfg.num_beams}"] = caption_report(teacher, splits["test"], tokenizer, num_beams=cfg.num_beams, **decode)
    if cfg.blind_steps:
        blind = build_captioner(cfg, seed=cfg.train.seed)
        # the same rule for the baseline: the 2x comparison is best against best (or last against last)
        blind_history = train_model(cfg, blind, train, None, steps=cfg.blind_steps, blank_images=True, checkpoint_dir=scratch / "blind",
                                    name="text-only", step_loss=_token_loss, validate=validate, keep_best=keep_best)
        results["text_only_greedy"] = caption_report(blind, splits["test"], tokenizer, blank_images=True, **decode)
    teacher_cider = results["teacher_greedy"]["cider_d"]
    blind_cider = results.get("text_only_greedy", {}).get("cider_d")
    metrics = {
        "test": results,
        "uses_image": None if blind_cider is None else bool(teacher_cider >= USES_IMAGE_RATIO * blind_cider and teacher_cider > blind_cider + 0.5),
        "cider_d_vs_text_only": None if blind_cider is None else teacher_cider - blind_cider,
        "parameters": params,
        "train_seconds": teacher_seconds,
        "total_seconds": time.perf_counter() - started,
        "history": history,
        "kept_step": next((h["step"] for h in history if h.get("kept")), history[-1]["step"] if history else None),
        "text_only_kept_step": next((h["step"] for h in blind_history if h.get("kept")), blind_history[-1]["step"] if blind_history else None)
        if cfg.blind_steps else None,
        "torch_threads": torch.get_num_threads(),
    }

    output.mkdir(parents=True, exist_ok=True)
    teacher.save_pretrained(output)
    save_tokenizer(tokenizer, output)
    (output / CAPTIONS_FILE).write_text(json.dumps(spec.to_dict(), indent=2))
    (output / JOB_CONFIG_FILE).write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    (output / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    table = scores_table({name: scores for name, scores in results.items()})
    (output / SCORES_FILE).write_text(table + "\n")
    shutil.rmtree(scratch, ignore_errors=True)
    _log("\ntest scores:\n" + table)
    if blind_cider is not None:
        verdict = "uses the image" if metrics["uses_image"] else f"WARNING: not {USES_IMAGE_RATIO:g}x the text-only decoder's CIDEr-D"
        _log(f"\nteacher CIDEr-D {teacher_cider:.3f} vs text-only {blind_cider:.3f} ({verdict})")
    _log(f"saved to {output} ({teacher_seconds / 60:.1f} min training)")
    return metrics
