"""``amad run`` for a captioner (``model.family: ved``): the smoke test and the report of a captioning run.

The stages are :mod:`pipeline.run`'s; where a captioner differs, they call here:

* **smoke** (:func:`smoke`): Serve the registered ``amad-captioner`` version on 127.0.0.1, caption the
  first test-split images over HTTP (``POST /v1/caption``, greedy) and check every caption, token for
  token, against greedy decoding of the exported graphs over ONNX Runtime called directly.
* **report** (:func:`compare`, :func:`alignment_weights`, :func:`write_report`): test-split CIDEr-D and
  BLEU-4 of teacher and student (greedy captions from their ONNX graphs: what ships), parameters, heads
  and layers per stack, and batch-1 greedy caption latency in the same runtime, thread count and calls
  interleaved (the teacher's graphs are exported here with TorchScript); the AMAD alignment weights
  ``a_ij`` (paper Eq. 2) of the chosen student **per attention kind** it was distilled on (encoder self,
  decoder self, cross), one heatmap each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.run_report import REPORT_DIR, copy_sweep_plots, plot_alignment

ALIGNMENT_FILE = "alignment.json"
KIND_STACK = {"encoder_self": "encoder", "decoder_self": "decoder", "cross": "decoder"}
KIND_TITLES = {"encoder_self": "encoder self-attention", "decoder_self": "decoder self-attention (causal)", "cross": "cross-attention"}


def teacher_scores(teacher_dir: Path) -> dict:
    """The captioning teacher's recorded test scores (``metrics.json`` of `amad teacher`), where there are any."""
    path = Path(teacher_dir) / "metrics.json"
    if not path.is_file():
        return {"test_cider_d": None, "test_bleu_4": None}
    greedy = json.loads(path.read_text()).get("test", {}).get("teacher_greedy", {})
    return {"test_cider_d": greedy.get("cider_d"), "test_bleu_4": greedy.get("bleu_4")}


def test_split(checkpoint: Path):
    from amad.data.captions import CaptionSpec, make_caption_split

    spec = CaptionSpec.from_dict(json.loads((Path(checkpoint) / "captions.json").read_text()))
    return spec, make_caption_split(spec, "test")


def onnx_captioner(encoder: str | Path, decoder: str | Path, checkpoint: Path, threads: int = 1):
    from pipeline.captioner_onnx import OnnxCaptioner, TokenIds
    from pipeline.onnx_tools import open_session

    config = json.loads((Path(checkpoint) / "config.json").read_text())
    tokens = TokenIds(int(config["decoder_start_token_id"]), int(config["eos_token_id"]), int(config["pad_token_id"]))
    return OnnxCaptioner(open_session(encoder, threads=threads), open_session(decoder, threads=threads), tokens)


def smoke(*, model_uri: str, tracking_uri: str, encoder: str, decoder: str, checkpoint: str, images: int, port: int, keep_running: bool) -> dict:
    """Serve ``model_uri`` (a captioner) and compare ``images`` served greedy captions with offline ones; returns the figures.

    Needs a connected Ray cluster (``amad run`` holds one); ``port`` 0 means any free port. Serve is shut
    down afterwards unless ``keep_running``."""
    from amad.data.images import pixels_from_uint8
    from pipeline.captioner_onnx import caption_ids
    from pipeline.local_cluster import free_port
    from pipeline.run_smoke import HOST, ask
    from serving.config import ServeConfig
    from serving.loadtest import caption_body, caption_examples
    from serving.server import start, stop

    checkpoint = Path(checkpoint)
    spec, test = test_split(checkpoint)
    examples = caption_examples(spec.to_dict(), images)  # the same images as PNG bytes, as a client sends them
    captioner = onnx_captioner(encoder, decoder, checkpoint)
    offline = [caption_ids(row, captioner.tokens) for row in captioner.greedy(pixels_from_uint8(test.images[: len(examples)]).numpy(),
                                                                              spec.max_caption_length).tolist()]
    port = port or free_port()
    cfg = ServeConfig(model=model_uri, tracking_uri=tracking_uri, host=HOST, port=port, replica_cpus=0.5, max_batch_size=8, batch_wait_ms=2.0)
    version = start(cfg)
    url = f"http://{HOST}:{port}/v1/caption"
    try:
        served = [ask(url, caption_body(example)) for example in examples]
    finally:
        if not keep_running:
            stop(cfg.app_name)
    agreed = sum(reply["tokens"] == want for reply, want in zip(served, offline))
    curl = f"curl -s -X POST {url} -H 'Content-Type: application/json' -d '{{\"image\": \"<base64 PNG>\", \"num_beams\": 1}}'"
    return {"questions": len(examples), "agreed": agreed, "served": [reply["caption"] for reply in served], "version": version, "port": port,
            "url": url if keep_running else None, "curl": curl if keep_running else None}


def _kind_heads(model, kind: str) -> list[int]:
    """Heads per layer of one attention kind (a pruned captioner's layers may differ)."""
    config = model.config
    pruning = getattr(config, "amad_pruning", None) or {}
    key = {"encoder_self": ("encoder", "heads"), "decoder_self": ("decoder", "self_heads"), "cross": ("decoder", "cross_heads")}[kind]
    kept = (pruning.get(key[0]) or {}).get(key[1])
    if kept:
        return [len(heads) for heads in kept]
    stack = getattr(config, key[0])
    return [stack.num_attention_heads] * stack.num_hidden_layers


def _origins(model, kind: str) -> list[list[list[int]]] | None:
    """Per student layer of ``kind``: the ``[teacher layer, teacher head]`` each of its heads was pruned from."""
    pruning = getattr(model.config, "amad_pruning", None) or {}
    stack, key = {"encoder_self": ("encoder", "heads"), "decoder_self": ("decoder", "self_heads"), "cross": ("decoder", "cross_heads")}[kind]
    record = pruning.get(stack) or {}
    if not record.get(key):
        return None
    return [[[t, h] for h in heads] for t, heads in zip(record["teacher_layers"], record[key])]


def alignment_weights(teacher, student, checkpoint: Path, objective: dict, examples: int, batch_size: int = 64) -> list[dict]:
    """Per attention kind the student was distilled on and per aligned ``(student layer, teacher layer)`` pair:
    ``a_ij`` ``(Ht, Hs)`` (paper Eq. 2, the objective's temperature) averaged over the first ``examples``
    validation (image, reference) pairs, teacher-forced; masked query rows (padding, the causal map's
    non-predicting rows) take no part, as in training."""
    from amad.data.captions import CaptionSpec, caption_training_set, make_caption_split
    from amad.data.text import load_tokenizer
    from amad.losses import align_weights
    from amad.models_ved import VedAdapter
    from amad.objective import resolve_layer_map

    spec = CaptionSpec.from_dict(json.loads((Path(checkpoint) / "captions.json").read_text()))
    pairs_set = caption_training_set(make_caption_split(spec, "val"), load_tokenizer(checkpoint), spec.max_caption_length)
    kinds = [kind for kind in objective.get("kinds") or KIND_STACK if kind in KIND_STACK]
    temperature = float(objective.get("amad_temperature", 1.0))
    layer_maps = objective.get("layer_maps") or {}
    teacher_layers, student_layers = VedAdapter.layers(teacher), VedAdapter.layers(student)
    plans = {kind: resolve_layer_map(layer_maps.get(kind, objective.get("layer_map", "uniform")),
                                     teacher_layers[KIND_STACK[kind]], student_layers[KIND_STACK[kind]]) for kind in kinds}
    sums: dict = {}
    count = 0
    indices = torch.arange(min(examples, len(pairs_set)))
    teacher.eval(), student.eval()
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            batch = pairs_set.batch(indices[start:start + batch_size])
            t_out = VedAdapter.forward(teacher, batch, need_attentions=True)
            s_out = VedAdapter.forward(student, batch, need_attentions=True)
            for kind, pairs in plans.items():
                for s_layer, t_layer in pairs:
                    a = align_weights(t_out.attentions[kind][t_layer], s_out.attentions[kind][s_layer], t_out.query_masks[kind],
                                      temperature=temperature).double().sum(0)
                    sums[(kind, s_layer, t_layer)] = a if (kind, s_layer, t_layer) not in sums else sums[(kind, s_layer, t_layer)] + a
            count += len(batch["pixel_values"])
    out = []
    for kind, pairs in plans.items():
        origins = _origins(student, kind)
        for s_layer, t_layer in pairs:
            out.append({"kind": kind, "student_layer": s_layer, "teacher_layer": t_layer, "examples": count, "temperature": temperature,
                        "weights": (sums[(kind, s_layer, t_layer)] / count).tolist(),
                        "student_head_origins": origins[s_layer] if origins else None})
    return out


def compare(teacher_dir: Path, checkpoint: Path, export_result: dict, report, workdir: Path) -> dict:
    """Test CIDEr-D / BLEU-4, size and batch-1 greedy caption latency of the teacher and the shipped student, both
    over ONNX Runtime with ``report.latency_threads`` threads, calls interleaved; and the report's targets."""
    from amad.data.images import pixels_from_uint8
    from amad.data.text import load_tokenizer
    from amad.data.captions import decode_caption
    from amad.metrics import caption_scores
    from amad.models_ved import VedAdapter
    from pipeline import onnx_tools
    from pipeline.captioner_onnx import DECODER_FILE, ENCODER_FILE, export_captioner

    spec, test = test_split(checkpoint)
    pixels = pixels_from_uint8(test.images)
    teacher_graphs = Path(workdir) / "report-teacher-onnx"
    if not (teacher_graphs / ENCODER_FILE).is_file() or not (teacher_graphs / DECODER_FILE).is_file():
        export_captioner(VedAdapter.load(teacher_dir).eval(), teacher_graphs, pixels[:2], exporter="torchscript")
    graphs = {"teacher": (teacher_dir, teacher_graphs / ENCODER_FILE, teacher_graphs / DECODER_FILE),
              "student": (checkpoint, Path(export_result["encoder"]), Path(export_result["decoder"]))}
    out = {"test_images": len(test), "latency_threads": report.latency_threads, "latency_repeats": report.latency_repeats,
           "max_length": spec.max_caption_length}
    one = pixels[:1].numpy()
    calls = {}
    for label, (directory, encoder, decoder) in graphs.items():
        model = VedAdapter.load(directory)
        captioner = onnx_captioner(encoder, decoder, directory, threads=report.latency_threads)
        tokenizer = load_tokenizer(directory)
        captions = [decode_caption(tokenizer, row) for start in range(0, len(pixels), 64)
                    for row in captioner.greedy(pixels[start:start + 64].numpy(), spec.max_caption_length).tolist()]
        scores = caption_scores(test.reference_map(), dict(zip(test.image_ids, captions)))
        out[label] = {
            "cider_d": scores["cider_d"], "bleu_4": scores["bleu_4"], "example": captions[0],
            "parameters": sum(p.numel() for p in model.parameters()),
            "heads": {kind: _kind_heads(model, kind) for kind in KIND_STACK},
            "layers": VedAdapter.layers(model), "pruned": bool(getattr(model.config, "amad_pruning", None)),
            "encoder_onnx": str(encoder), "decoder_onnx": str(decoder),
        }
        calls[label] = lambda captioner=captioner: captioner.greedy(one, spec.max_caption_length)
    for label, times in onnx_tools.interleaved_latency_ms(calls, repeats=report.latency_repeats).items():
        out[label]["p50_ms"], out[label]["p99_ms"] = times["p50"], times["p99"]
    out["speedup"] = out["teacher"]["p50_ms"] / out["student"]["p50_ms"]
    out["latency_ratio"] = out["student"]["p50_ms"] / out["teacher"]["p50_ms"]
    out["parameter_ratio"] = out["teacher"]["parameters"] / out["student"]["parameters"]
    out["cider_ratio"] = out["student"]["cider_d"] / out["teacher"]["cider_d"] if out["teacher"]["cider_d"] else None
    out["targets"] = {}
    if report.max_cider_drop is not None:
        met = out["cider_ratio"] is not None and out["cider_ratio"] >= 1 - report.max_cider_drop
        out["targets"]["cider_d"] = {"max_drop": report.max_cider_drop, "met": met}
    if report.max_latency_ratio is not None:
        out["targets"]["latency"] = {"max_ratio": report.max_latency_ratio, "met": out["latency_ratio"] <= report.max_latency_ratio}
    return out


def write_report(directory: Path, *, comparison: dict, alignment: list[dict], history: list[dict], sweep_plots: list[Path], context: dict) -> list[Path]:
    """``report.md``, one alignment heatmap per kind, ``alignment.json``, the learning curves and the sweep's plots."""
    from pipeline.run_report import _pyplot

    directory.mkdir(parents=True, exist_ok=True)
    (directory / ALIGNMENT_FILE).write_text(json.dumps(alignment, indent=2))
    files = [directory / ALIGNMENT_FILE]
    kinds = list(dict.fromkeys(layer["kind"] for layer in alignment))
    for kind in kinds:
        files.append(plot_alignment([layer for layer in alignment if layer["kind"] == kind], directory / f"alignment_{kind}.png"))
    curves = None
    if history:
        plt = _pyplot()
        figure, axes = plt.subplots(1, 2, figsize=(9, 3.3))
        epochs = [h["epoch"] for h in history]
        axes[0].plot(epochs, [h.get("train_loss") for h in history], "o-", label="train loss (total)")
        axes[0].legend(fontsize="small")
        axes[1].plot(epochs, [h.get("val_cider_d") for h in history], "o-", color="tab:green")
        axes[1].set_ylabel("validation CIDEr-D (greedy)")
        for axis in axes:
            axis.set_xlabel("epoch")
            axis.grid(alpha=0.3)
        figure.tight_layout()
        curves = directory / "learning_curves.png"
        figure.savefig(curves, dpi=100)
        plt.close(figure)
        files.append(curves)
    copied = copy_sweep_plots(directory, sweep_plots)
    files += copied

    t, s = comparison["teacher"], comparison["student"]

    def heads(m: dict) -> str:
        return " / ".join(f"{max(m['heads'][kind])}" for kind in KIND_STACK)

    lines = [
        f"# amad run `{context['name']}` (captioning)",
        "",
        f"Captioning teacher `{context['teacher']}` distilled with AMAD; student chosen by sweep `{context['sweep']}` "
        f"(trial `{context['trial']}`, by validation CIDEr-D), exported to ONNX (encoder and decoder) and registered as "
        f"**{context['registered']}**.",
        "",
        f"## Teacher vs student (test split, {comparison['test_images']} images, greedy captions of at most "
        f"{comparison['max_length']} tokens; ONNX Runtime, CPU, batch 1, {comparison['latency_threads']} thread(s), calls interleaved)",
        "",
        "| model | test CIDEr-D | test BLEU-4 | parameters | heads (enc self / dec self / cross) | layers (enc / dec) | caption p50 latency |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, m in (("teacher", t), ("student", s)):
        lines.append(f"| {label} | {m['cider_d']:.3f} | {m['bleu_4'] * 100:.2f} | {m['parameters']:,} | {heads(m)} | "
                     f"{m['layers']['encoder']} / {m['layers']['decoder']} | {m['p50_ms']:.2f} ms |")
    ratio = f"{comparison['cider_ratio']:.2f}x the teacher's CIDEr-D" if comparison["cider_ratio"] is not None else "CIDEr-D not comparable (teacher 0)"
    lines += ["", f"Student: **{comparison['speedup']:.1f}x** faster than the teacher at batch 1, "
                  f"{comparison['parameter_ratio']:.1f}x fewer parameters, {ratio}.", "",
              f"First test image: teacher *\"{t['example']}\"*, student *\"{s['example']}\"*.", ""]
    targets = comparison.get("targets") or {}
    if "cider_d" in targets:
        lines.append(f"- Target CIDEr-D: student >= (1 - {targets['cider_d']['max_drop']:g}) x the teacher's: "
                     f"**{'met' if targets['cider_d']['met'] else 'NOT met'}** ({ratio}).")
    if "latency" in targets:
        lines.append(f"- Target latency: student caption p50 <= {targets['latency']['max_ratio']:g} x the teacher's: "
                     f"**{'met' if targets['latency']['met'] else 'NOT met'}** ({comparison['latency_ratio']:.2f} x).")
    if targets:
        lines.append("")
    lines += ["## Sweep", ""]
    lines += [f"![{p.stem}]({p.name})" for p in copied] or ["(no sweep plots: matplotlib missing or no measured trial)"]
    lines += ["", "## Learning curves of the chosen trial", "", "![learning curves](learning_curves.png)" if curves else "(no history)", ""]
    lines += ["## AMAD alignment per attention kind (paper Eq. 2)", ""]
    if alignment:
        lines += [f"Alignment weights `a_ij` of the chosen student (temperature {alignment[0]['temperature']:g}), averaged over "
                  f"{alignment[0]['examples']} validation (image, reference) pairs, teacher-forced: row i is teacher head i's softmax "
                  f"over the student heads (red: the teacher head a student head was pruned from). Numbers in `{ALIGNMENT_FILE}`.", ""]
    else:
        lines += ["(the chosen student was not distilled on attention maps)", ""]
    for kind in kinds:
        lines += [f"### {KIND_TITLES[kind]}", "", f"![alignment {kind}](alignment_{kind}.png)", ""]
        for layer in (layer for layer in alignment if layer["kind"] == kind):
            weights = np.asarray(layer["weights"])
            lines.append(f"- student layer {layer['student_layer']} <- teacher layer {layer['teacher_layer']}: mean row maximum "
                         f"{weights.max(1).mean():.2f} (uniform would be {1 / weights.shape[1]:.2f})")
        lines.append("")
    (directory / "report.md").write_text("\n".join(lines) + "\n")
    files.insert(0, directory / "report.md")
    return files


def report_dir(workdir: Path) -> Path:
    return Path(workdir) / REPORT_DIR
