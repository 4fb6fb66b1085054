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
