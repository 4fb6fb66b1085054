"""A captioner as two ONNX graphs: greedy captions over ONNX Runtime equal ``generate``'s token for token,
teacher-forced logits agree to 1e-4, for a whole and a pruned captioner and both exporters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from amad.data.captions import CaptionSpec, caption_training_set, make_caption_split
from amad.data.images import pixels_from_uint8
from amad.data.text import load_tokenizer
from amad.models_ved import VedAdapter
from amad.pruning_ved import plan, prune_from_plan, score
from pipeline.captioner_onnx import DECODER_FILE, ENCODER_FILE, OnnxCaptioner, TokenIds, export_captioner, parity
from pipeline.onnx_tools import open_session


@pytest.fixture(scope="module")
def captioner_and_images(trained_tiny_captioner):
    model = VedAdapter.load(trained_tiny_captioner).eval()
    spec = CaptionSpec.from_dict(json.loads((trained_tiny_captioner / "captions.json").read_text()))
    test = make_caption_split(spec, "test")
    return model, spec, pixels_from_uint8(test.images), trained_tiny_captioner


def _captioner(directory, model) -> OnnxCaptioner:
    return OnnxCaptioner(open_session(directory / ENCODER_FILE, threads=1), open_session(directory / DECODER_FILE, threads=1),
                         TokenIds.of(model.config))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_greedy_captions_over_onnx_runtime_are_generates_token_for_token(captioner_and_images, tmp_path, exporter):
    model, spec, pixels, _ = captioner_and_images
    export_captioner(model, tmp_path, pixels[:2], exporter=exporter)
    captioner = _captioner(tmp_path, model)
    figures = parity(model, captioner, pixels, spec.max_caption_length, batch_size=4)
    assert figures["images"] == len(pixels) == 10
    assert figures["identical_greedy"] == 1.0 and figures["max_abs_logit_diff"] <= 1e-4, figures
    expected = VedAdapter.generate(model, pixels, max_length=spec.max_caption_length)
    assert len({tuple(row) for row in expected.tolist()}) > 1, "the captions should differ between images"


@pytest.mark.parametrize("num_beams, max_length", [(2, None), (3, None), (3, 6)])
def test_beam_search_over_onnx_runtime_is_generates_token_for_token(captioner_and_images, tmp_path, num_beams, max_length):
    """The numpy beam search returns what ``generate(num_beams=k, early_stopping=True)`` returns: the same ids,
    the same length, the same fill after a caption's end, also when ``max_length`` cuts captions short."""
    model, spec, pixels, _ = captioner_and_images
    max_length = max_length or spec.max_caption_length
    export_captioner(model, tmp_path, pixels[:2])
    expected = VedAdapter.generate(model, pixels, max_length=max_length, num_beams=num_beams).numpy()
    got = _captioner(tmp_path, model).beam(pixels.numpy(), max_length, num_beams)
    assert got.shape == expected.shape and (got == expected).all()
    greedy = VedAdapter.generate(model, pixels, max_length=max_length).numpy()
    assert got.shape != greedy.shape or (got != greedy).any(), "beam search should change some caption of this captioner"


def test_a_pruned_captioner_exports_and_batches_do_not_change_a_caption(captioner_and_images, tmp_path):
    """Per-layer head counts of a pruned captioner go through the export; an image's caption is the same
    alone, in a batch of 3 and in the whole batch (rows that end early are padded, not cut)."""
    model, spec, pixels, directory = captioner_and_images
    train = caption_training_set(make_caption_split(spec, "train"), load_tokenizer(directory), spec.max_caption_length)
    pruned = prune_from_plan(model, plan(score(model, train.subset(torch.arange(16)).batches(8)), 2, 1)).eval()
    export_captioner(pruned, tmp_path, pixels[:2])
    captioner = _captioner(tmp_path, pruned)
    assert parity(pruned, captioner, pixels, spec.max_caption_length)["identical_greedy"] == 1.0
    whole = captioner.greedy(pixels.numpy(), spec.max_caption_length)
    for index in range(3):
        alone = captioner.greedy(pixels[index:index + 1].numpy(), spec.max_caption_length)[0]
        trio = captioner.greedy(pixels[index:index + 3].numpy(), spec.max_caption_length)[0]
        assert alone.tolist() == trio[: len(alone)].tolist() == whole[index][: len(alone)].tolist()
        assert set(trio[len(alone):].tolist()) <= {captioner.tokens.pad}
    assert np.all(whole[:, 0] == captioner.tokens.start)


@pytest.mark.parametrize("pruned", [False, True])
def test_the_decoder_with_past_key_values_writes_generates_captions_one_token_per_step(captioner_and_images, tmp_path, pruned):
    """cross_kv.onnx + decoder_step.onnx: every greedy caption is generate's, the per-step logits are the whole-prefix
    decoder's to 1e-4 (teacher-forced, padding included), also for a pruned captioner with per-layer head counts."""
    from pipeline.captioner_cache import CROSS_FILE, STEP_FILE, CachedCaptioner, cached_parity, export_cached_decoder
    from pipeline.captioner_onnx import EncoderGraph

    model, spec, pixels, directory = captioner_and_images
    if pruned:
        train = caption_training_set(make_caption_split(spec, "train"), load_tokenizer(directory), spec.max_caption_length)
        model = prune_from_plan(model, plan(score(model, train.subset(torch.arange(16)).batches(8)), 2, 1)).eval()
    export_captioner(model, tmp_path, pixels[:2])
    with torch.no_grad():
        export_cached_decoder(model, tmp_path, EncoderGraph(model)(pixels[:2]))
    plain = _captioner(tmp_path, model)
    cached = CachedCaptioner(plain.encoder, open_session(tmp_path / CROSS_FILE, threads=1), open_session(tmp_path / STEP_FILE, threads=1),
                             plain.tokens, CachedCaptioner.heads_of(model))
    figures = cached_parity(model, cached, pixels, spec.max_caption_length, batch_size=4)
    assert figures["images"] == 10 and figures["identical_greedy"] == 1.0 and figures["max_abs_logit_diff"] <= 1e-4, figures
    hidden = plain.encode(pixels.numpy())
    lengths = [18, 3, 7, 18, 2, 18, 5, 18, 18, 9]
    assert cached.greedy_retiring(hidden, lengths) == plain.greedy_retiring(hidden, lengths)
    for num_beams, max_length in ((2, spec.max_caption_length), (3, spec.max_caption_length), (3, 6)):  # the beams carry their caches
        expected = VedAdapter.generate(model, pixels, max_length=max_length, num_beams=num_beams).numpy()
        got = cached.beam_encoded(hidden, max_length, num_beams)
        assert got.shape == expected.shape and (got == expected).all(), (num_beams, max_length)


def test_bad_export_requests_are_named(captioner_and_images, tmp_path):
    model, spec, pixels, _ = captioner_and_images
    with pytest.raises(ValueError, match="at least 2 images"):
        export_captioner(model, tmp_path, pixels[:1])
    with pytest.raises(ValueError, match="exporter='onnx' must be 'dynamo' or 'torchscript'"):
        export_captioner(model, tmp_path, pixels[:2], exporter="onnx")
    assert not any(tmp_path.iterdir()), "a refused export wrote files"
    export_captioner(model, tmp_path, pixels[:2])
    with pytest.raises(ValueError, match="max_length=1 must be >= 2"):
        _captioner(tmp_path, model).greedy(pixels[:2].numpy(), 1)
    with pytest.raises(ValueError, match="num_beams=0 >= 1"):
        _captioner(tmp_path, model).beam(pixels[:2].numpy(), 8, 0)


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_amad_export_gates_and_registers_a_captioner_that_mlflow_pyfunc_loads_and_runs(captioner_and_images, tmp_path, monkeypatch):
    """`amad export` on a captioner checkpoint: both graphs pass the parity gate, `amad-captioner` v1 is the
    champion, and `mlflow.pyfunc.load_model` captions PNG bytes, base64 text and arrays as `generate` does
    (greedy and beam); a gate the graphs cannot meet exits 1 and registers nothing."""
    import base64
    import subprocess
    import sys
    from pathlib import Path

    import mlflow.pyfunc
    import pandas as pd
    import yaml

    from amad.data.captions import decode_caption
    from pipeline.registry import CHAMPION, Registry

    model, spec, _, directory = captioner_and_images
    root = Path(__file__).resolve().parents[1]
    env = {key: value for key, value in __import__("os").environ.items() if key != "MLFLOW_TRACKING_URI"}
    command = [sys.executable, "-m", "pipeline.cli", "export", "--config", str(root / "tune_configs" / "tiny" / "export.yaml"),
               "--checkpoint", str(directory), "--workdir", str(tmp_path)]
    ok = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "amad export: amad-captioner v1 @champion (first champion)" in ok.stdout
    (report_file,) = tmp_path.glob("exports/*/report.json")
    report = json.loads(report_file.read_text())
    assert report["passed"] and report["family"] == "ved" and report["gates"]["parity_fp32"]["identical_greedy"] == 1.0
    assert report["gates"]["parity_cached"]["identical_greedy"] == 1.0 and report["gates"]["parity_cached"]["max_abs_logit_diff"] <= 1e-4
    assert report["gates"]["parity_fp32"]["images"] == len(make_caption_split(spec, "val")) == 8 and report["val_cider_d"] > 0.05
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    champion = Registry(uri).alias_version("amad-captioner", CHAMPION)
    assert str(champion.version) == "1" and float(champion.tags["val_cider_d"]) == pytest.approx(report["val_cider_d"], abs=1e-6)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    loaded = mlflow.pyfunc.load_model("models:/amad-captioner@champion")
    val = make_caption_split(spec, "val")
    tokenizer = load_tokenizer(directory)
    pixels = pixels_from_uint8(val.images)
    expected = [decode_caption(tokenizer, row) for row in VedAdapter.generate(model, pixels, max_length=spec.max_caption_length).tolist()]
    assert list(loaded.predict(pd.DataFrame({"image": [_png(image) for image in val.images]}))["caption"]) == expected
    frame = pd.DataFrame({"image": [_png(image) for image in val.images]})
    beams = [decode_caption(tokenizer, row) for row in VedAdapter.generate(model, pixels, max_length=spec.max_caption_length, num_beams=2).tolist()]
    assert list(loaded.predict(frame, params={"num_beams": 2})["caption"]) == beams
    short = [decode_caption(tokenizer, row) for row in VedAdapter.generate(model, pixels, max_length=5).tolist()]
    assert list(loaded.predict(frame, params={"max_length": 5})["caption"]) == short
    with pytest.raises(Exception, match="image 1: "):
        loaded.predict(pd.DataFrame({"image": [_png(val.images[0]), b"not an image"]}))
    with pytest.raises(Exception, match="num_beams=9 must be in 1..8"):
        loaded.predict(frame[:1], params={"num_beams": 9})
    python_model = loaded.unwrap_python_model()  # the class itself also takes base64 text and arrays
    as_text = pd.DataFrame({"image": [base64.b64encode(_png(image)).decode() for image in val.images[:2]]})
    assert list(python_model.predict(None, as_text)["caption"]) == expected[:2] == list(python_model.predict(None, val.images[:2])["caption"])

    strict = yaml.safe_load((root / "tune_configs" / "tiny" / "export.yaml").read_text())
    strict["gates"]["max_abs_logit_diff"] = 1e-12  # ONNX Runtime's logits differ by ~1e-6: the gate must fail
    config = tmp_path / "strict.yaml"
    config.write_text(yaml.safe_dump(strict))
    failed = subprocess.run([*command[:5], str(config), *command[6:]], capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert failed.returncode == 1 and "parity gate failed" in failed.stderr and "nothing was registered" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert [str(v.version) for v in Registry(uri).versions("amad-captioner")] == ["1"]
