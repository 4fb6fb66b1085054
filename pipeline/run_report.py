"""The report of ``amad run``: teacher vs chosen student, the sweep's Pareto plot, learning curves, and
the AMAD alignment heatmap. Markdown plus PNGs under ``<workdir>/report/``, readable without MLflow.

The heatmap shows, per aligned layer pair, the alignment weights ``a_ij`` (paper Eq. 2; rows: the
teacher's heads, columns: the student's) of the chosen student, computed by
:func:`amad.losses.align_weights` with the objective's temperature on validation questions and
averaged over them: which teacher heads each student head absorbed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from amad.data.dataset import VQASplit
from amad.losses import align_weights
from amad.models import PRUNING_KEY, ViltAdapter
from amad.pruning import origins
from amad.objective import resolve_layer_map

REPORT_DIR = "report"
ALIGNMENT_FILE = "alignment.json"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def alignment_weights(teacher, student, split: VQASplit, layer_map, temperature: float, examples: int, batch_size: int = 64) -> list[dict]:
    """Per ``(student_layer, teacher_layer)`` pair: ``a_ij`` ``(Ht, Hs)`` averaged over the first
    ``examples`` questions of ``split`` (each question's ``(Ht, Hs)`` weights weigh equally)."""
    pairs = resolve_layer_map(layer_map, teacher.config.num_hidden_layers, student.config.num_hidden_layers)
    sums = {pair: None for pair in pairs}
    count = 0
    teacher.eval()
    student.eval()
    indices = torch.arange(min(examples, len(split)))
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            batch = split.batch(indices[start : start + batch_size])
            t_out = ViltAdapter.forward(teacher, batch, need_attentions=True)
            s_out = ViltAdapter.forward(student, batch, need_attentions=True)
            mask = t_out.query_masks["self"]
            for s_layer, t_layer in pairs:
                a = align_weights(t_out.attentions["self"][t_layer], s_out.attentions["self"][s_layer], mask, temperature=temperature)
                total = a.double().sum(0)
                sums[(s_layer, t_layer)] = total if sums[(s_layer, t_layer)] is None else sums[(s_layer, t_layer)] + total
            count += batch["labels"].shape[0]
    origin = origins(student)
    return [
        {"student_layer": s, "teacher_layer": t, "weights": (sums[(s, t)] / count).tolist(), "examples": count, "temperature": temperature,
         # the teacher (layer, head) each student head was pruned from; None for a student not pruned from the teacher
         "student_head_origins": [list(o) for o in origin[s]] if getattr(student.config, PRUNING_KEY, None) else None}
        for s, t in pairs
    ]


def target_lines(comparison: dict) -> list[str]:
    """The report's verdict on the run config's targets (``report.max_accuracy_drop`` and
    ``report.max_latency_ratio``), one line each; none when no target is set."""
    targets = comparison.get("targets") or {}
    lines = []
    if "accuracy" in targets:
        target = targets["accuracy"]
        lines.append(f"- Target accuracy: student >= teacher - {target['max_drop_points']:g} points: "
                     f"**{'met' if target['met'] else 'NOT met'}** (drop {comparison['accuracy_drop_points']:.1f} points).")
    if "latency" in targets:
        target = targets["latency"]
        lines.append(f"- Target latency: student ONNX p50 <= {target['max_ratio']:g} x the teacher's: "
                     f"**{'met' if target['met'] else 'NOT met'}** ({comparison['latency_ratio']:.2f} x).")
    return lines + [""] if lines else []


def copy_sweep_plots(directory: Path, plots: list[Path]) -> list[Path]:
    """The sweep's plots copied into the report directory as ``sweep_<name>``; returns the copies."""
    copied = []
    for plot in plots:
        target = directory / f"sweep_{plot.name}"
        shutil.copy(plot, target)
        copied.append(target)
    return copied


def plot_alignment(layers: list[dict], path: Path) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers) + 1, 4.2), squeeze=False)
    for axis, layer in zip(axes[0], layers):
        weights = np.asarray(layer["weights"])
        image = axis.imshow(weights, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        axis.set_title(f"student layer {layer['student_layer']} <- teacher layer {layer['teacher_layer']}", fontsize=9)
        axis.set_xlabel("student head j")
        axis.set_ylabel("teacher head i")
        axis.set_xticks(range(weights.shape[1]))
        axis.set_yticks(range(weights.shape[0]))
        for i in range(weights.shape[0]):
            for j in range(weights.shape[1]):
                axis.text(j, i, f"{weights[i, j]:.2f}", ha="center", va="center", fontsize=6, color="white" if weights[i, j] < 0.5 else "black")
        for j, (origin_layer, origin_head) in enumerate(layer.get("student_head_origins") or []):
            if origin_layer == layer["teacher_layer"]:  # outline the teacher head this student head was pruned from
                axis.add_patch(plt.Rectangle((j - 0.5, origin_head - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
        if layer.get("student_head_origins"):
            axis.set_xlabel("student head j (red: the teacher head it was pruned from)")
    figure.colorbar(image, ax=axes[0].tolist(), label="alignment weight a_ij (mean over validation questions)")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_learning_curves(history: list[dict], path: Path) -> Path | None:
    """Train loss and validation accuracy per epoch of the chosen trial."""
    if not history:
        return None
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    axes[0].plot(epochs, [h.get("train_loss") for h in history], "o-", label="train loss (total)")
    if all("val_loss" in h for h in history):
        axes[0].plot(epochs, [h["val_loss"] for h in history], "s-", label="validation CE")
    axes[0].set_xlabel("epoch")
    axes[0].legend(fontsize="small")
    axes[1].plot(epochs, [h.get("val_accuracy") for h in history], "o-", color="tab:green")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("validation accuracy")
    for axis in axes:
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def write_report(directory: Path, *, comparison: dict, alignment: list[dict], history: list[dict], sweep_plots: list[Path], context: dict) -> list[Path]:
    """Write ``report.md``, the PNGs and ``alignment.json`` into ``directory``; returns the files."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    (directory / ALIGNMENT_FILE).write_text(json.dumps(alignment, indent=2))
    files.append(directory / ALIGNMENT_FILE)
    files.append(plot_alignment(alignment, directory / "alignment_heatmap.png"))
    curves = plot_learning_curves(history, directory / "learning_curves.png")
    if curves:
        files.append(curves)
    copied = copy_sweep_plots(directory, sweep_plots)
    files += copied

    t, s = comparison["teacher"], comparison["student"]
    lines = [
        f"# amad run `{context['name']}`",
        "",
        f"Teacher `{context['teacher']}` distilled with AMAD; student chosen by sweep `{context['sweep']}` "
        f"(trial `{context['trial']}`), exported to ONNX and registered as **{context['registered']}**.",
        "",
        f"## Teacher vs student (test split, {comparison['test_questions']} questions; ONNX Runtime, CPU, batch 1, "
        f"{comparison.get('latency_threads', 'default')} thread(s), calls interleaved)",
        "",
    ]
    # VQA-v2 files carry ten human answers per question: their soft accuracy is the figure VQA papers quote
    vqa = "vqa_accuracy" in s and "vqa_accuracy" in t
    lines += [
        "| model | test accuracy | " + ("VQA accuracy | " if vqa else "") + "parameters | heads | layers | hidden | ONNX p50 latency |",
        "| --- | --- | " + ("--- | " if vqa else "") + "--- | --- | --- | --- | --- |",
    ]
    for label, m in (("teacher", t), ("student", s)):
        soft = f"{m['vqa_accuracy']:.2%} | " if vqa else ""
        lines.append(f"| {label} | {m['accuracy']:.2%} | {soft}{m['parameters']:,} | {m['heads']} | {m['layers']} | {m['hidden']} | {m['p50_ms']:.2f} ms |")
    lines += [
        "",
        f"Student: **{comparison['speedup']:.1f}x** faster than the teacher at batch 1, "
        f"{comparison['parameter_ratio']:.1f}x fewer parameters, accuracy {(s['accuracy'] - t['accuracy']) * 100:+.1f} points.",
        "",
    ]
    lines += target_lines(comparison)
    lines += [
        "## Sweep",
        "",
    ]
    lines += [f"![{p.stem}]({p.name})" for p in copied] or ["(no sweep plots: matplotlib missing or no measured trial)"]
    lines += ["", "## Learning curves of the chosen trial", "", "![learning curves](learning_curves.png)" if curves else "(no history)", ""]
    lines += [
        "## AMAD alignment (paper Eq. 2)",
        "",
        f"Alignment weights `a_ij` of the chosen student (temperature {alignment[0]['temperature']:g}), averaged over "
        f"{alignment[0]['examples']} validation questions: row i is teacher head i's softmax over the student heads. "
        "A row close to one-hot means that teacher head was absorbed by one student head; a flat row means it is "
        f"spread over all of them. Numbers in `{ALIGNMENT_FILE}`.",
        "",
        "![alignment heatmap](alignment_heatmap.png)",
        "",
    ]
    for layer in alignment:
        weights = np.asarray(layer["weights"])
        lines.append(
            f"- student layer {layer['student_layer']} <- teacher layer {layer['teacher_layer']}: each student head's share of the "
            f"teacher heads {np.round(weights.sum(0), 2).tolist()} (sum over teacher heads); mean row maximum {weights.max(1).mean():.2f} "
            f"(uniform would be {1 / weights.shape[1]:.2f})"
        )
    (directory / "report.md").write_text("\n".join(lines) + "\n")
    files.insert(0, directory / "report.md")
    return files
