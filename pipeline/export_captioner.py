"""``amad export`` for a captioner (a checkpoint with ``captions.json``): two ONNX graphs, gated, registered.

export (``encoder.onnx`` + ``decoder.onnx``, :mod:`pipeline.captioner_onnx`) -> parity gate on validation
images (every greedy caption identical to ``generate``'s, token for token, and teacher-forced logits
within ``gates.max_abs_logit_diff``) -> validation CIDEr-D / BLEU-4 of the ONNX Runtime captions ->
batch-1 greedy latency -> ``report.json`` -> (registry enabled) an MLflow pyfunc model registered as
``registry.captioner_model`` (``amad-captioner``) with the champion/challenger rule on ``val_cider_d``.
Nothing is registered when a gate fails. Graph optimisation and int8 are VQA-student steps: a captioner
ships its fp32 graphs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


from pipeline import onnx_tools
from pipeline.config import ConfigError
from pipeline.export import GateFailed
from pipeline.export_config import ExportJobConfig
from pipeline.registry import TAG_WEIGHTS_SHA, Registry, file_sha256

CAPTIONS_FILE = "captions.json"
REPORT = "report.json"
TAG_VAL_CIDER_D = "val_cider_d"


def _log(message: str) -> None:
    print(f"amad export: {message}", flush=True)


def is_captioner(directory: Path) -> bool:
    return (Path(directory) / CAPTIONS_FILE).is_file()


def main(cfg: ExportJobConfig, workdir: Path, uri: str, source, name: str) -> dict:
    """Export, gate and register the captioner at ``source.checkpoint``; returns the report."""
    from amad.data.captions import CaptionSpec, decode_caption, make_caption_split
    from amad.data.images import pixels_from_uint8
    from amad.data.text import load_tokenizer
    from amad.metrics import caption_scores
    from amad.models_ved import VedAdapter
    from pipeline.captioner_cache import CachedCaptioner, cached_parity, export_cached_decoder
    from pipeline.captioner_onnx import EncoderGraph, OnnxCaptioner, TokenIds, export_captioner, parity

    if cfg.int8:
        raise ConfigError("int8: a captioner ships fp32 graphs (dynamic int8 quantisation is gated on VQA accuracy only); set int8: false")
    checkpoint = Path(source.checkpoint)
    directory = workdir / "exports" / name
    directory.mkdir(parents=True, exist_ok=True)
    model = VedAdapter.load(checkpoint).eval()
    spec = CaptionSpec.from_dict(json.loads((checkpoint / CAPTIONS_FILE).read_text()))
    tokenizer = load_tokenizer(checkpoint)
    val = make_caption_split(spec, "val")
    pixels = pixels_from_uint8(val.images)
    weights_sha = file_sha256(checkpoint / "model.safetensors")
    report: dict = {"name": name, "family": "ved", "checkpoint": source.location, "parameters": sum(p.numel() for p in model.parameters()),
                    "weights_sha256": weights_sha, "gates": {}, "passed": False}
    encoder, decoder = export_captioner(model, directory, pixels[:2], exporter=cfg.exporter, opset=cfg.opset)
    captioner = OnnxCaptioner(onnx_tools.open_session(encoder, threads=cfg.threads), onnx_tools.open_session(decoder, threads=cfg.threads),
                              TokenIds.of(model.config))
    figures = parity(model, captioner, pixels[: cfg.gates.parity_examples], spec.max_caption_length)
    _gate(report, "parity_fp32", figures, cfg.gates.max_abs_logit_diff, directory, "", "parity fp32")
    # the decoder with past key/values (pipeline.captioner_cache): what greedy captioning runs on, behind the same gate
    cross_kv, step = export_cached_decoder(model, directory, EncoderGraph(model)(pixels[:2]).detach())
    cached = CachedCaptioner(captioner.encoder, onnx_tools.open_session(cross_kv, threads=cfg.threads), onnx_tools.open_session(step, threads=cfg.threads),
                             captioner.tokens, CachedCaptioner.heads_of(model))
    figures = cached_parity(model, cached, pixels[: cfg.gates.parity_examples], spec.max_caption_length)
    _gate(report, "parity_cached", figures, cfg.gates.max_abs_logit_diff, directory, " for the cached decoder", "parity of the cached decoder")

    ids = captioner.greedy(pixels.numpy(), spec.max_caption_length)
    scores = caption_scores(val.reference_map(), dict(zip(val.image_ids, (decode_caption(tokenizer, row) for row in ids.tolist()))))
    report.update(val_cider_d=scores["cider_d"], val_bleu_4=scores["bleu_4"], val_images=len(val))
    one = pixels[:1].numpy()
    report["latency_ms_b1"] = onnx_tools.latency_ms(
        lambda: cached.greedy_retiring(captioner.encode(one), [spec.max_caption_length]), repeats=cfg.latency_repeats)
    report["shipped"] = {"encoder": str(encoder), "decoder": str(decoder), "cross_kv": str(cross_kv), "decoder_step": str(step),
                         "precision": "fp32", "providers": captioner.encoder.get_providers()}
    report["passed"] = True
    _log(f"shipping {encoder.name} + {decoder.name} + {cross_kv.name} + {step.name} (fp32): val CIDEr-D {scores['cider_d']:.3f}, BLEU-4 {scores['bleu_4']:.3f}, "
         f"batch-1 greedy caption p50 {report['latency_ms_b1']['p50']:.2f} ms (cached decoder)")
    if cfg.registry.enabled:
        report["registry"] = register(cfg, report, checkpoint, directory, workdir, uri)
    (directory / REPORT).write_text(json.dumps(report, indent=2))
    return report


def _gate(report: dict, key: str, figures: dict, limit: float, directory: Path, which: str, label: str) -> None:
    """Record ``figures`` as ``report["gates"][key]``; GateFailed (with the report written) unless every greedy caption
    was identical and the largest logit difference is within ``limit``."""
    report["gates"][key] = figures
    described = (f"{figures['identical_greedy']:.2%} of {figures['images']} greedy captions identical, "
                 f"max |Δlogit| {figures['max_abs_logit_diff']:.2e} (limit {limit:g})")
    if figures["identical_greedy"] < 1.0 or not figures["max_abs_logit_diff"] <= limit:
        report["failure"] = f"parity gate failed{which}: {described}"
        (directory / REPORT).write_text(json.dumps(report, indent=2))
        raise GateFailed(report["failure"])
    _log(f"{label}: {described}: passed")


def register(cfg: ExportJobConfig, report: dict, checkpoint: Path, directory: Path, workdir: Path, uri: str) -> dict:
    """The captioner as an MLflow pyfunc model version of ``registry.captioner_model``, champion if no worse."""
    from pipeline.captioner_pyfunc import CaptionerModel, signature

    registry = Registry(uri)
    name = cfg.registry.captioner_model
    run_id = registry.start_run("amad-export", report["name"], workdir / "mlartifacts")
    try:
        artifacts = {"encoder": Path(report["shipped"]["encoder"]), "decoder": Path(report["shipped"]["decoder"]),
                     "cross_kv": Path(report["shipped"]["cross_kv"]), "decoder_step": Path(report["shipped"]["decoder_step"]),
                     "tokenizer": checkpoint / "tokenizer.json", "config": checkpoint / "config.json", "captions": checkpoint / CAPTIONS_FILE}
        tags = {
            TAG_WEIGHTS_SHA: report["weights_sha256"], TAG_VAL_CIDER_D: f"{report['val_cider_d']:.6f}", "val_bleu_4": f"{report['val_bleu_4']:.6f}",
            "family": "ved", "checkpoint": report["checkpoint"], "parameters": str(report["parameters"]), "precision": "fp32",
            "parity.identical_greedy": f"{report['gates']['parity_fp32']['identical_greedy']:.6f}",
            "parity.max_abs_logit_diff": f"{report['gates']['parity_fp32']['max_abs_logit_diff']:.3g}",
            "parity.images": str(report["gates"]["parity_fp32"]["images"]),
            "parity.cached_identical_greedy": f"{report['gates']['parity_cached']['identical_greedy']:.6f}",
            "parity.cached_max_abs_logit_diff": f"{report['gates']['parity_cached']['max_abs_logit_diff']:.3g}",
            "latency.p50_ms_b1": f"{report['latency_ms_b1']['p50']:.4f}", "export_run_id": run_id,
        }
        registry.client.log_metric(run_id, "val_cider_d", report["val_cider_d"], int(time.time() * 1000), 0)
        version, model_uri = registry.log_and_register_pyfunc(
            run_id=run_id, python_model=CaptionerModel(), artifacts=artifacts, name=name, artifact_name="captioner",
            signature=signature(), input_example=None, tags=tags, pip_requirements=["onnxruntime", "numpy", "pandas", "tokenizers", "pillow"])
        alias, reason = registry.promote(name, version, report["val_cider_d"], promote=cfg.registry.promote,
                                         require_no_worse=cfg.registry.require_no_worse, metric=TAG_VAL_CIDER_D)
        registry.client.set_terminated(run_id, "FINISHED")
    except BaseException:
        registry.client.set_terminated(run_id, "FAILED")
        raise
    _log(f"registered {name} v{version} as @{alias} ({reason})")
    return {"model": name, "version": version, "alias": alias, "reason": reason, "model_uri": model_uri, "run_id": run_id, "tracking_uri": uri}

