"""A Hugging Face ViLT VQA checkpoint as a teacher: stock parity of the deterministic embedding on the
checkpoint's own processed inputs (aspect-preserving resize, padded batches, pixel masks), its export
with dynamic image size, its pre-processing from one place, and clear errors for directories that are
not such a checkpoint. Checkpoints are written here with ``save_pretrained``; nothing is downloaded."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from transformers import ViltConfig, ViltForQuestionAnswering

from amad.data.benchmark import BenchmarkSpec, make_split
from amad.data.preprocess import CheckpointProcessor, WordLevelSquare, load_preprocessor
from amad.data.text import load_tokenizer
from amad.hf_checkpoint import check_vilt_checkpoint, train_wordpiece, write_vilt_checkpoint
from amad.models import ViltAdapter
from pipeline import onnx_tools

QUESTIONS = ["what color is the bus ?", "how many cats are there ?", "is there a dog ?", "what is the man holding ?"]
LABELS = ("no", "yes", "2", "red")
# (height, width) of "photos": landscape, portrait, a strip, a square, and ViLT's 640x480 example
PHOTOS = [(480, 640), (640, 480), (120, 400), (300, 300)]


def _config(**overrides) -> ViltConfig:
    values = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=384,
                  patch_size=32, max_position_embeddings=12, id2label=dict(enumerate(LABELS)),
                  label2id={a: i for i, a in enumerate(LABELS)})
    values.update(overrides)
    return ViltConfig(**values)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A stock ViLT VQA checkpoint directory (random weights, a WordPiece tokenizer trained here)."""
    return write_vilt_checkpoint(tmp_path_factory.mktemp("hf") / "vilt-vqa", _config(), train_wordpiece(QUESTIONS * 5, 200))


def _photos(seed: int = 0, sizes=PHOTOS) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _batch(preprocessor, photos, questions=QUESTIONS) -> dict[str, torch.Tensor]:
    input_ids, attention_mask = preprocessor.encode(questions[: len(photos)])
    return {"input_ids": input_ids, "attention_mask": attention_mask, **preprocessor.pixels([preprocessor.image_array(p) for p in photos])}


def _inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_mask") if k in batch}


def test_the_checkpoint_processor_keeps_the_aspect_ratio_and_pads_per_batch(checkpoint):
    preprocessor = load_preprocessor(checkpoint)
    assert isinstance(preprocessor, CheckpointProcessor) and preprocessor.masked
    batch = _batch(preprocessor, _photos())
    # ViLT's own example: a 640x480 photo becomes 384x512; the batch is padded to the largest image
    height, width = batch["pixel_values"].shape[-2:]
    assert batch["pixel_values"].shape[:2] == (4, 3) and height % 32 == 0 and width % 32 == 0
    assert batch["pixel_mask"].shape == (4, height, width)
    assert batch["pixel_mask"][0].sum(0).max() == 384 and batch["pixel_mask"][0].sum(1).max() == 512
    assert batch["pixel_mask"][1].sum(0).max() == 512 and batch["pixel_mask"][1].sum(1).max() == 384
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 12)
    assert preprocessor.count_tokens("what color is the bus") == 5


def test_logits_equal_the_stock_model_on_the_processors_inputs(checkpoint):
    preprocessor = load_preprocessor(checkpoint)
    stock = ViltForQuestionAnswering.from_pretrained(str(checkpoint)).eval()
    ours = ViltAdapter.load(checkpoint).eval()
    for seed, sizes in ((0, PHOTOS), (1, [(200, 500), (500, 200), (384, 384)])):
        batch = _batch(preprocessor, _photos(seed, sizes))
        with torch.no_grad():
            expected = stock(**_inputs(batch)).logits
            for _ in range(2):  # stock samples its patch order; ours is the same every call
                assert torch.allclose(ours(**_inputs(batch)).logits, expected, atol=1e-5, rtol=0)
    # the image moves the logits by far more than the tolerance (the comparison is not vacuous)
    with torch.no_grad():
        blank = {**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])}
        assert (stock(**_inputs(blank)).logits - expected).abs().max() > 1e-4


def test_a_full_mask_at_the_configured_size_equals_the_square_mode(checkpoint):
    ours = ViltAdapter.load(checkpoint).eval()
    ids = torch.randint(5, 50, (2, 12))
    pixels = torch.randn(2, 3, 384, 384)
    with torch.no_grad():
        square = ours(input_ids=ids, pixel_values=pixels).logits
        masked = ours(input_ids=ids, pixel_values=pixels, pixel_mask=torch.ones(2, 384, 384, dtype=torch.long)).logits
    assert torch.equal(square, masked)
    with pytest.raises(ValueError, match="pass a pixel_mask for images of other sizes"):
        ours(input_ids=ids, pixel_values=torch.randn(2, 3, 384, 512))


def test_the_adapter_masks_padding_patches_out_of_the_attention_maps(checkpoint):
    preprocessor = load_preprocessor(checkpoint)
    ours = ViltAdapter.load(checkpoint).eval()
    batch = _batch(preprocessor, _photos(sizes=[(480, 640), (120, 400)]))
    with torch.no_grad():
        out = ViltAdapter.forward(ours, batch)
    mask = out.query_masks["self"]
    height, width = batch["pixel_values"].shape[-2:]
    grid = (height // 32) * (width // 32)
    assert mask.shape == (2, 12 + 1 + grid) and out.attentions["self"][0].shape[-1] == mask.shape[1]
    text = batch["attention_mask"].sum(1)
    real = batch["pixel_mask"][:, ::32, ::32].flatten(1).sum(1)  # patches of real pixels, as the processor sized them
    assert real[0] == 12 * 16 and 0 < real[1] < grid
    assert torch.equal(mask.sum(1), text + 1 + real)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_export_takes_the_pixel_mask_and_any_image_size(checkpoint, tmp_path, exporter):
    preprocessor = load_preprocessor(checkpoint)
    ours = ViltAdapter.load(checkpoint).eval()
    example = _batch(preprocessor, _photos(sizes=[(480, 640), (300, 300)]))
    path = onnx_tools.export_onnx(ours, tmp_path / "m.onnx", example, exporter=exporter)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(onnx_tools.MASKED_INPUT_NAMES)
    other = _batch(preprocessor, _photos(2, [(200, 700), (640, 480), (100, 100)]), QUESTIONS[:3])
    assert other["pixel_values"].shape[-2:] != example["pixel_values"].shape[-2:]
    for batch in (example, other):
        with torch.no_grad():
            expected = ours(**_inputs(batch)).logits.numpy()
        got = session.run([onnx_tools.OUTPUT_NAME], onnx_tools.model_inputs(batch))[0]
        assert np.abs(got - expected).max() <= 1e-4


def test_head_and_neuron_importance_ignore_padding_patches(checkpoint):
    """Michel importance on a padded batch of photos of different shapes equals the importance of each
    photo scored alone: per-example gradients and FFN activations over real tokens only."""
    from amad.pruning import score

    preprocessor = load_preprocessor(checkpoint)
    model = ViltAdapter.load(checkpoint)
    photos = _photos(3)
    batch = {**_batch(preprocessor, photos), "labels": torch.tensor([0, 1, 2, 3])}
    alone = [{**_batch(preprocessor, [photo], [question]), "labels": torch.tensor([label])}
             for photo, question, label in zip(photos, QUESTIONS, range(4))]
    assert batch["pixel_mask"].float().mean() < 1  # the batch really is padded
    together, separate = score(model, [batch]), score(model, alone)
    assert together.examples == separate.examples == 4
    torch.testing.assert_close(together.heads, separate.heads, atol=1e-5, rtol=1e-4)
    # FFN scores are mean |activation| per real token: the same tokens whichever way they are batched
    torch.testing.assert_close(together.ffn, separate.ffn, atol=1e-5, rtol=1e-4)


def test_our_own_teachers_keep_their_word_level_square_preprocessing(tiny_teacher):
    preprocessor = load_preprocessor(tiny_teacher)
    assert isinstance(preprocessor, WordLevelSquare) and not preprocessor.masked
    spec = BenchmarkSpec.from_dict(json.loads((tiny_teacher / "benchmark.json").read_text()))
    split = make_split(spec, "val", load_tokenizer(tiny_teacher))
    batch = split.batch(torch.arange(4))
    assert preprocessor.max_text_length == spec.max_question_length
    texts = ["what shape is the red object ?"]
    ids, mask = preprocessor.encode(texts)
    assert ids.shape == (1, spec.max_question_length) and mask.sum() == 9  # [CLS] + 7 words + [SEP]
    images = split.images[split.image_index[:4].numpy()]
    assert torch.equal(preprocessor.pixels(list(images))["pixel_values"], batch["pixel_values"])


def test_preprocessing_travels_with_its_files(checkpoint, tmp_path):
    preprocessor = load_preprocessor(checkpoint)
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(checkpoint / "config.json", copy / "config.json")
    preprocessor.save(copy)
    again = load_preprocessor(copy)
    photos = _photos(3, [(100, 300), (300, 100)])
    a, b = _batch(preprocessor, photos), _batch(again, photos)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _broken(checkpoint, tmp_path, name):
    target = tmp_path / name
    shutil.copytree(checkpoint, target)
    return target


def test_directories_that_are_not_a_vilt_vqa_checkpoint_are_named(checkpoint, tmp_path):
    assert check_vilt_checkpoint(checkpoint)["model_type"] == "vilt"
    with pytest.raises(FileNotFoundError, match="no such directory"):
        check_vilt_checkpoint(tmp_path / "nothing")
    other = _broken(checkpoint, tmp_path, "bert")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ValueError, match=r"bert/config.json: model_type is 'bert'; a teacher must be a ViLT"):
        check_vilt_checkpoint(other)
    headless = _broken(checkpoint, tmp_path, "headless")
    (headless / "config.json").write_text(json.dumps({**config, "architectures": ["ViltModel"], "id2label": {}}))
    with pytest.raises(ValueError, match=r"has no question-answering head"):
        check_vilt_checkpoint(headless)
    unlabeled = _broken(checkpoint, tmp_path, "unlabeled")
    (unlabeled / "config.json").write_text(json.dumps({**config, "id2label": {"0": "LABEL_0"}}))
    with pytest.raises(ValueError, match=r"id2label has 1 answers"):
        check_vilt_checkpoint(unlabeled)
    for name, files, message in (("no-processor", ["processor_config.json"], "no preprocessor_config.json or processor_config.json"),
                                 ("no-tokenizer", ["tokenizer.json"], "no tokenizer files"),
                                 ("no-weights", ["model.safetensors"], "no weights")):
        broken = _broken(checkpoint, tmp_path, name)
        for file in files:
            (broken / file).unlink()
        with pytest.raises(ValueError, match=message):
            check_vilt_checkpoint(broken)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(checkpoint / "config.json", bare / "config.json")
    with pytest.raises(FileNotFoundError, match="no preprocessor_config.json or processor_config.json .* and no tokenizer.json"):
        load_preprocessor(bare)
