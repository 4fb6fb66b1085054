"""Captioning speed and quality: teacher and student captioners in PyTorch ``generate`` and over ONNX Runtime.

Run from the repository root (``--quick`` is a smoke run on a tiny random captioner and its pruned student):

    .venv/bin/python benchmarks/caption_inference.py --student runs/distill-captioner/ray/distill-captioner/epoch_0003
    .venv/bin/python benchmarks/caption_inference.py --quick --out /tmp/caption_inference.json

**Models.** The teacher is ``--teacher`` (default ``weights/captioner-default``), the student ``--student`` (a
captioner checkpoint, e.g. from ``amad distill --config tune_configs/distill-captioner.yaml``). Both are
exported alike (:mod:`pipeline.captioner_onnx`: encoder and decoder graphs, ``--exporter``) and must pass
the export's parity gate (100 % identical greedy captions on the validation images, max |Δlogit| <= 1e-4)
before they are timed.

**Variants.** ``<who>_torch``: PyTorch ``generate`` (it caches keys and values); ``<who>_ort``: ONNX Runtime with
the decoder run over the whole prefix at every step (``decoder.onnx``); ``<who>_ort_cached``: ONNX Runtime with
the decoder with past key/values (:mod:`pipeline.captioner_cache`, what ``amad export`` ships for greedy
captions and ``/v1/caption`` runs), behind its own parity gate (the same captions, per-step logits to 1e-4).

**Measurement.** Greedy captions of at most the captions' longest (18 tokens: up to 16 words). Batch-1
latency: p50/p99 over ``--repeats`` single-image captions, every variant interleaved round-robin (load on
a shared machine hits all alike); batch-32 throughput: images per second over ``--repeats`` // 4 batches
of 32. Quality: greedy CIDEr-D and BLEU-4 on the test images (``--quick``: the validation images), over
ONNX Runtime (equal to PyTorch's by the parity gate). torch and ONNX Runtime get the same thread count
(``--threads``, default 1). Writes ``benchmarks/results/caption_inference.json`` with the command,
``p50_ms``, ``p99_ms``, ``images_per_s_b32``, the scores and the ratios the targets are about (issue 25:
student ORT >= 2x student PyTorch at batch 1; student CIDEr-D within 5 % of the teacher's). Nothing asserts
on time.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import amad  # noqa: F401
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # the sibling scripts: inference.py's timing loop, compare_captioning's tiny captioner

import numpy as np  # noqa: E402
import torch  # noqa: E402

from amad.data.captions import CaptionSpec, caption_training_set, decode_caption, make_caption_split  # noqa: E402
from amad.data.images import pixels_from_uint8  # noqa: E402
from amad.data.text import load_tokenizer  # noqa: E402
from amad.metrics import caption_scores  # noqa: E402
from amad.models_ved import VedAdapter  # noqa: E402
from pipeline import onnx_tools  # noqa: E402
from pipeline.captioner_cache import CROSS_FILE, STEP_FILE, CachedCaptioner, cached_parity, export_cached_decoder  # noqa: E402
from pipeline.captioner_onnx import EncoderGraph, OnnxCaptioner, TokenIds, export_captioner, parity  # noqa: E402
from inference import interleaved  # noqa: E402  (round-robin over variants, the same as the VQA benchmark's)

VARIANTS = ("teacher_torch", "teacher_ort", "teacher_ort_cached", "student_torch", "student_ort", "student_ort_cached")
DEFAULT_TEACHER = ROOT / "weights" / "captioner-default"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "caption_inference.json"
CAPTIONS_FILE = "captions.json"
TARGETS = {
    "ort_vs_torch_student_b1": "student ORT batch-1 greedy caption >= 2x faster than student PyTorch generate",
    "student_cider_vs_teacher": "student test CIDEr-D >= 0.95x the teacher's",
}


def torch_runner(model, max_length: int):
    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return VedAdapter.generate(model, torch.from_numpy(pixels), max_length=max_length).numpy()
    return run


def ort_runner(captioner: OnnxCaptioner, max_length: int):
    def run(pixels: np.ndarray) -> np.ndarray:
        return captioner.greedy(pixels, max_length)
    return run


def cached_runner(cached: CachedCaptioner, captioner: OnnxCaptioner, max_length: int):
    def run(pixels: np.ndarray) -> list[list[int]]:
        return cached.greedy_retiring(captioner.encode(pixels), [max_length] * len(pixels))
    return run


def gated_captioner(model, pixels: torch.Tensor, directory: Path, max_length: int, exporter: str,
                    threads: int) -> tuple[OnnxCaptioner, CachedCaptioner, dict]:
    """``model`` exported (both decoders) and opened, after the export's parity gates on ``pixels``; SystemExit if one fails."""
    encoder, decoder = export_captioner(model, directory, pixels[:2], exporter=exporter)
    captioner = OnnxCaptioner(onnx_tools.open_session(encoder, threads=threads), onnx_tools.open_session(decoder, threads=threads),
                              TokenIds.of(model.config))
    with torch.no_grad():
        export_cached_decoder(model, directory, EncoderGraph(model)(pixels[:2]))
    cached = CachedCaptioner(captioner.encoder, onnx_tools.open_session(directory / CROSS_FILE, threads=threads),
                             onnx_tools.open_session(directory / STEP_FILE, threads=threads), captioner.tokens, CachedCaptioner.heads_of(model))
    figures = {"whole_prefix": parity(model, captioner, pixels, max_length), "cached": cached_parity(model, cached, pixels, max_length)}
    for name, found in figures.items():
        if found["identical_greedy"] < 1.0 or not found["max_abs_logit_diff"] <= 1e-4:
            raise SystemExit(f"{directory.name}: the exported captioner ({name} decoder) fails the parity gate ({found}): not timing it")
    return captioner, cached, figures


def quick_models(directory: Path) -> tuple[Path, Path]:
    """A random tiny captioner (compare_captioning.py's) and a student pruned from it, saved as checkpoints."""
    import compare_captioning

    from amad.pruning_ved import plan, prune_from_plan, score

    teacher_dir = compare_captioning.quick_teacher(directory / "teacher")
    teacher = VedAdapter.load(teacher_dir).eval()
    spec = CaptionSpec.from_dict(json.loads((teacher_dir / CAPTIONS_FILE).read_text()))
    train = caption_training_set(make_caption_split(spec, "train"), load_tokenizer(teacher_dir), spec.max_caption_length)
    student = prune_from_plan(teacher, plan(score(teacher, train.subset(torch.arange(16)).batches(8)), 2, 1))
    student_dir = directory / "student"
    student.save_pretrained(student_dir)
    for name in ("tokenizer.json", CAPTIONS_FILE):
        (student_dir / name).write_bytes((teacher_dir / name).read_bytes())
    return teacher_dir, student_dir


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(DEFAULT_TEACHER))
    parser.add_argument("--student", default=None, help="a captioner checkpoint directory (required unless --quick)")
    parser.add_argument("--exporter", default="torchscript", choices=onnx_tools.EXPORTERS)
    parser.add_argument("--repeats", type=int, default=100, help="batch-1 captions per variant (batch 32: a quarter)")
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT threads, the same for every variant")
    parser.add_argument("--quick", action="store_true", help="a tiny random captioner and its pruned student, 10 repeats")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 10)
    elif not args.student:
        parser.error("--student is required (a captioner checkpoint; see tune_configs/distill-captioner.yaml)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        teacher_dir, student_dir = quick_models(scratch / "models") if args.quick else (Path(args.teacher), Path(args.student))
        models = {"teacher": VedAdapter.load(teacher_dir).eval(), "student": VedAdapter.load(student_dir).eval()}
        spec = CaptionSpec.from_dict(json.loads((teacher_dir / CAPTIONS_FILE).read_text()))
        student_spec = CaptionSpec.from_dict(json.loads((student_dir / CAPTIONS_FILE).read_text()))
        if (student_spec.seed, student_spec.scene, student_spec.test_scenes) != (spec.seed, spec.scene, spec.test_scenes):
            raise SystemExit(f"{student_dir}: its captions.json is not the teacher's data (seed, scenes, test split): no fair comparison")
        tokenizer = load_tokenizer(teacher_dir)
        max_length = spec.max_caption_length
        val, test = make_caption_split(spec, "val"), make_caption_split(spec, "test")
        scored = val if args.quick else test
        val_pixels = pixels_from_uint8(val.images)
        captioners, cached, gates = {}, {}, {}
        for who, model in models.items():
            captioners[who], cached[who], gates[who] = gated_captioner(model, val_pixels, scratch / who, max_length, args.exporter, args.threads)
        runners = {f"{who}_torch": torch_runner(model, max_length) for who, model in models.items()}
        runners.update({f"{who}_ort": ort_runner(captioners[who], max_length) for who in models})
        runners.update({f"{who}_ort_cached": cached_runner(cached[who], captioners[who], max_length) for who in models})
        runners = {name: runners[name] for name in VARIANTS}
        scores = {}
        pixels = pixels_from_uint8(scored.images).numpy()
        for who, captioner in captioners.items():
            captions = []
            for i in range(0, len(pixels), 128):
                captions += [decode_caption(tokenizer, row) for row in captioner.greedy(pixels[i:i + 128], max_length).tolist()]
            scores[who] = caption_scores(scored.reference_map(), dict(zip(scored.image_ids, captions)))
        singles = [pixels[i:i + 1] for i in range(min(32, len(pixels)))]
        b1 = interleaved(runners, singles, args.repeats)
        batches = [pixels[np.arange(i, i + 32) % len(pixels)] for i in range(0, 32 * 4, 32)]
        b32 = interleaved(runners, batches, max(3, args.repeats // 4))

    p50 = {k: float(np.percentile(v, 50)) for k, v in b1.items()}
    p99 = {k: float(np.percentile(v, 99)) for k, v in b1.items()}
    per_s = {k: 32 / (float(np.median(v)) / 1e3) for k, v in b32.items()}
    ratios = {
        "ort_vs_torch_student_b1": p50["student_torch"] / p50["student_ort"],
        "ort_vs_torch_teacher_b1": p50["teacher_torch"] / p50["teacher_ort"],
        "student_vs_teacher_ort_b1": p50["student_ort"] / p50["teacher_ort"],
        "cached_vs_torch_student_b1": p50["student_torch"] / p50["student_ort_cached"],
        "cached_vs_whole_prefix_student_b1": p50["student_ort"] / p50["student_ort_cached"],
        "cached_vs_whole_prefix_student_b32": per_s["student_ort_cached"] / per_s["student_ort"],
        "student_vs_teacher_ort_cached_b1": p50["student_ort_cached"] / p50["teacher_ort_cached"],
        "student_vs_teacher_torch_b1": p50["student_torch"] / p50["teacher_torch"],
        "student_cider_vs_teacher": scores["student"]["cider_d"] / scores["teacher"]["cider_d"] if scores["teacher"]["cider_d"] else float("nan"),
    }
    results = {
        "command": " ".join(["python", "benchmarks/caption_inference.py", *(argv if argv is not None else sys.argv[1:])]),
        "p50_ms": p50, "p99_ms": p99, "images_per_s_b32": per_s,
        "scores": {who: {k: v for k, v in s.items() if k != "examples"} for who, s in scores.items()},
        "ratios": ratios,
        "meets_targets": {"ort_vs_torch_student_b1": ratios["ort_vs_torch_student_b1"] >= 2.0,
                          "student_cider_vs_teacher": ratios["student_cider_vs_teacher"] >= 0.95},
        "targets": TARGETS,
        "parity": gates,
        "config": {
            "teacher": "random tiny (quick)" if args.quick else str(teacher_dir.resolve()),
            "student": "pruned from it, untrained (quick)" if args.quick else str(student_dir.resolve()),
            "parameters": {who: sum(p.numel() for p in model.parameters()) for who, model in models.items()},
            "scored_split": "val" if args.quick else "test", "scored_images": len(scored), "max_length": max_length,
            "repeats_b1": args.repeats, "threads": args.threads, "exporter": args.exporter, "quick": args.quick,
            "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__, "machine": platform.machine(),
        },
    }
    print(f"{'variant':18} | {'p50 ms':>7} | {'p99 ms':>7} | {'b32 img/s':>9}")
    for name in VARIANTS:
        print(f"{name:18} | {p50[name]:7.2f} | {p99[name]:7.2f} | {per_s[name]:9.0f}")
    for who, s in scores.items():
        print(f"{who}: {results['config']['scored_split']} CIDEr-D {s['cider_d']:.3f}, BLEU-4 {100 * s['bleu_4']:.2f}")
    print(f"student ORT vs student PyTorch, batch 1: {ratios['ort_vs_torch_student_b1']:.2f}x faster (target >= 2x); "
          f"student vs teacher over ORT: {ratios['student_vs_teacher_ort_b1']:.2f}x the teacher's p50; "
          f"student CIDEr-D {ratios['student_cider_vs_teacher']:.3f}x the teacher's (target >= 0.95); the cached decoder: "
          f"{ratios['cached_vs_whole_prefix_student_b1']:.2f}x (batch 1) and {ratios['cached_vs_whole_prefix_student_b32']:.2f}x (batch 32) "
          f"the whole-prefix one for the student")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
