"""Captioning data (issue 24): templated captions of the generated scenes, encoding, COCO-captions-format files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from amad.data.captions import (
    MAX_CAPTION_WORDS, CaptionSpec, caption_tokenizer, caption_vocabulary, decode_caption, describe, encode_captions,
    load_coco_captions, make_caption_split, position, relation, teacher_forcing,
)
from amad.data.scenes import COLOURS, SceneObject, SceneSpec


def test_relations_follow_the_larger_offset_and_columns_on_a_tie():
    a = SceneObject("red", "circle", 2, 2)
    assert relation(a, SceneObject("blue", "square", 2, 4)) == "left of"
    assert relation(a, SceneObject("blue", "square", 3, 0)) == "right of"
    assert relation(a, SceneObject("blue", "square", 5, 3)) == "above"
    assert relation(a, SceneObject("blue", "square", 0, 1)) == "below"
    assert relation(a, SceneObject("blue", "square", 4, 4)) == "left of"  # |dc| = |dr|: columns


def test_positions_name_a_half_and_an_odd_grids_middle_gets_the_other_axis():
    rng = np.random.default_rng(0)
    even = SceneSpec(grid=6)
    seen = {position(SceneObject("red", "circle", 1, 4), even, rng) for _ in range(50)}
    assert seen == {"at the top", "on the right"}
    odd = SceneSpec(grid=5)
    assert {position(SceneObject("red", "circle", 2, 0), odd, rng) for _ in range(20)} == {"on the left"}
    assert {position(SceneObject("red", "circle", 4, 2), odd, rng) for _ in range(20)} == {"at the bottom"}
    assert position(SceneObject("red", "circle", 2, 2), odd, rng) == "in the middle"


def test_every_caption_is_true_of_its_scene_short_and_in_the_vocabulary():
    spec = SceneSpec()
    rng = np.random.default_rng(1)
    objects = [SceneObject("orange", "triangle", 0, 0), SceneObject("blue", "square", 0, 5), SceneObject("red", "circle", 5, 5)]
    vocabulary = set(caption_vocabulary())
    captions = {describe(objects, spec, rng) for _ in range(400)}
    allowed = {  # every caption these three objects allow, written out by hand
        "an orange triangle left of a blue square", "a blue square right of an orange triangle",
        "an orange triangle left of a red circle", "a red circle right of an orange triangle",
        "a blue square above a red circle", "a red circle below a blue square",
    }
    for text in captions:
        words = text.split()
        assert len(words) <= MAX_CAPTION_WORDS and set(words) <= vocabulary, text
        assert "an orange" in text or "orange" not in text
        if " and " not in text:
            assert text in allowed, text
        if text.startswith("there are"):
            assert text.startswith("there are 3 objects and ")
        for phrase, obj in (("orange triangle", objects[0]), ("blue square", objects[1]), ("red circle", objects[2])):
            if f"{phrase} at the top" in text:
                assert obj.row < 3
            if f"{phrase} on the right" in text:
                assert obj.col >= 3
    templates = {("there" in t, " and " in t, any(r in t for r in ("left of", "right of", "above", "below"))) for t in captions}
    assert len(templates) == 4  # all four templates occur


def test_generated_splits_are_deterministic_distinct_and_encode_within_the_length():
    spec = CaptionSpec(train_scenes=40, val_scenes=10, test_scenes=10, references_per_image=3)
    train, again, val = make_caption_split(spec, "train"), make_caption_split(spec, "train"), make_caption_split(spec, "val")
    assert np.array_equal(train.images, again.images) and train.references == again.references
    assert not np.array_equal(train.images[:10], val.images)
    assert len(train) == 40 and all(len(refs) == 3 for refs in train.references) and train.image_ids[:2] == ["0", "1"]
    index, texts = train.pairs()
    assert index.tolist()[:4] == [0, 0, 0, 1] and len(texts) == 120
    tokenizer = caption_tokenizer()
    ids, mask = encode_captions(tokenizer, texts, spec.max_caption_length)
    assert ids.shape == (120, MAX_CAPTION_WORDS + 2)
    assert [decode_caption(tokenizer, row.tolist()) for row in ids] == texts  # whole rows: [CLS] first, [PAD] after [SEP]
    assert decode_caption(tokenizer, [2, tokenizer.token_to_id("red"), 0, 1, tokenizer.token_to_id("circle")]) == "red [UNK] circle"
    forced = teacher_forcing(ids, mask)
    assert forced["decoder_input_ids"].shape == forced["labels"].shape == (120, MAX_CAPTION_WORDS + 1)
    assert ((forced["labels"] == -100) == (mask[:, 1:] == 0)).all()
    with pytest.raises(ValueError, match=r"caption 'a b c d' is 6 tokens with \[CLS\] and \[SEP\], over max_length=5"):
        encode_captions(tokenizer, ["a b c d"], 5)
    with pytest.raises(ValueError, match=r"max_caption_length=10 must be >= 18"):
        CaptionSpec(max_caption_length=10)
    with pytest.raises(ValueError, match=r"split='dev' must be one of"):
        make_caption_split(spec, "dev")


# ---------------------------------------------------------------- COCO-captions-format files


def _coco(tmp_path, images=None, annotations=None, files=("1.png", "2.png")):
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for index, name in enumerate(files):
        Image.new("RGB", (20 + index, 30), (200, 10 * index, 0)).save(folder / name)
    data = {
        "images": images if images is not None else [{"id": 1, "file_name": "1.png"}, {"id": 2, "file_name": "2.png"}],
        "annotations": annotations if annotations is not None else [
            {"id": 10, "image_id": 1, "caption": "A red  Square."}, {"id": 11, "image_id": 2, "caption": "a dark red square"},
            {"id": 12, "image_id": 1, "caption": "red square on black"}],
    }
    path = tmp_path / "captions_val.json"
    path.write_text(json.dumps(data))
    return path, folder


def test_coco_captions_files_load_in_image_order_with_every_caption(tmp_path):
    path, folder = _coco(tmp_path)
    split = load_coco_captions(path, folder, 16)
    assert split.image_ids == ["1", "2"] and split.images.shape == (2, 16, 16, 3) and split.images.dtype == np.uint8
    assert split.references == [["a red square.", "red square on black"], ["a dark red square"]]
    assert tuple(split.images[0, 8, 8]) == (200, 0, 0)
    assert split.reference_map() == {"1": ["a red square.", "red square on black"], "2": ["a dark red square"]}


@pytest.mark.parametrize(
    "images, annotations, files, message",
    [
        (None, [{"image_id": 3, "caption": "x"}], ("1.png", "2.png"), r"captions_val.json: an annotation names image id 3, which 'images' does not list"),
        (None, [{"image_id": 1, "caption": "x"}], ("1.png", "2.png"), r"captions_val.json: 1 listed image\(s\) have no caption \(e.g. image id 2\)"),
        ([{"id": 1, "file_name": "1.png"}, {"id": 1, "file_name": "2.png"}], None, ("1.png", "2.png"), r"image id 1 is listed twice"),
        ([{"id": 1}], None, ("1.png",), r"every entry of 'images' needs 'id' and 'file_name'"),
        (None, [{"image_id": 1, "caption": 5}], ("1.png",), r"every entry of 'annotations' needs 'image_id' and a 'caption' string"),
        (None, [{"image_id": 1, "caption": "  "}, {"image_id": 2, "caption": "x"}], ("1.png", "2.png"), r"image id 1 has an empty caption"),
        (None, None, ("1.png",), r"image id 2: file .*2.png not found"),
    ],
)
def test_coco_captions_files_that_do_not_fit_name_the_file_and_the_id(tmp_path, images, annotations, files, message):
    path, folder = _coco(tmp_path, images, annotations, files)
    with pytest.raises(ValueError, match=message):
        load_coco_captions(path, folder, 16)


def test_coco_captions_unreadable_inputs_are_named(tmp_path):
    path, folder = _coco(tmp_path)
    (folder / "2.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"image id 2: .*2.png is not a readable image"):
        load_coco_captions(path, folder, 16)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"captions_val.json: not valid JSON"):
        load_coco_captions(path, folder, 16)
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=r"expected COCO captions format: an object with lists 'images' and 'annotations'"):
        load_coco_captions(path, folder, 16)
    with pytest.raises(ValueError, match=r"nope.json: caption file not found"):
        load_coco_captions(tmp_path / "nope.json", folder, 16)


def test_the_caption_vocabulary_is_a_few_dozen_words_with_every_colour():
    words = caption_vocabulary()
    assert 20 <= len(words) <= 60 and set(COLOURS) <= set(words)
    assert caption_tokenizer().token_to_id("[PAD]") == 0
