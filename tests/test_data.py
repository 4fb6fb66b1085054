"""The generated benchmark, the tokenizer and image pre-processing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from amad.data.benchmark import BenchmarkSpec, benchmark_tokenizer, make_split
from amad.data.images import decode_image, pixels_from_uint8
from amad.data.scenes import ANSWERS, COLOURS, QUESTION_TYPES, SceneObject, SceneSpec, ask, generate, render
from amad.data.text import UNK, build_tokenizer_from_texts, encode_questions, load_tokenizer, save_tokenizer

SPEC = SceneSpec(grid=6, cell=8)

# A hand-made scene (row, col on the 6x6 grid):
#   red circle (0,0), blue square (0,5), green triangle (5,0), yellow circle (2,1)
SCENE = [
    SceneObject("red", "circle", 0, 0),
    SceneObject("blue", "square", 0, 5),
    SceneObject("green", "triangle", 5, 0),
    SceneObject("yellow", "circle", 2, 1),
]


class FixedChoice:
    """A stand-in for numpy's Generator that makes ``ask`` pick the anchor (and partner) we want."""

    def __init__(self, integers: list[int], random: float = 0.9, choices: list[str] | None = None):
        self._integers, self._random, self._choices = list(integers), random, list(choices or [])

    def integers(self, high):
        return self._integers.pop(0)

    def random(self):
        return self._random

    def choice(self, options):
        return self._choices.pop(0)


@pytest.mark.parametrize(
    "qtype, integers, choices, expected_text, expected_answer",
    [
        ("shape", [0], [], "what shape is the red object ?", "circle"),
        ("left_half", [1], [], "is the blue object on the left ?", "no"),
        ("top_half", [2], [], "is the green object on the top ?", "no"),
        ("exists", [0], ["blue", "circle"], "is there a blue circle ?", "no"),
        ("exists", [0], ["blue", "square"], "is there a blue square ?", "yes"),
        ("count_shape", [0], ["circle"], "how many circle objects are there ?", "2"),
        ("closest_shape", [0], [], "what shape is the object closest to the red object ?", "circle"),
        ("furthest_shape", [3], [], "what shape is the object furthest from the yellow object ?", "square"),
        ("closest_colour", [1], [], "what colour is the object closest to the blue object ?", "yellow"),
        ("left_of", [0, 0], [], "is the red object left of the blue object ?", "yes"),
        ("count_same_shape", [3], [], "how many other objects have the same shape as the yellow object ?", "1"),
    ],
)
def test_questions_have_the_answers_a_person_reads_off_the_scene(qtype, integers, choices, expected_text, expected_answer):
    text, answer = ask(qtype, SCENE, SPEC, FixedChoice(integers, choices=choices))
    assert (text, answer) == (expected_text, expected_answer)
    assert answer in ANSWERS


def test_distance_ties_are_not_asked():
    # red (0,0) is at squared distance 4 from both (0,2) and (2,0): "closest" has no answer
    tied = [SceneObject("red", "circle", 0, 0), SceneObject("blue", "square", 0, 2), SceneObject("green", "triangle", 2, 0)]
    assert ask("closest_shape", tied, SPEC, FixedChoice([0])) is None


def test_render_draws_each_object_in_its_cell_and_shapes_differ():
    image = render(SCENE, SPEC)
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    red_cell = image[0:8, 0:8].reshape(-1, 3)
    assert (red_cell == COLOURS["red"]).all(axis=1).sum() > 10
    empty_cell = image[8:16, 24:32]
    assert (empty_cell == 40).all()
    masks = {obj.shape: (image[obj.row * 8 : obj.row * 8 + 8, obj.col * 8 : obj.col * 8 + 8] != 40).any(-1) for obj in SCENE}
    assert not np.array_equal(masks["circle"], masks["square"])
    assert not np.array_equal(masks["circle"], masks["triangle"])


def test_generation_is_deterministic_by_seed_and_splits_differ():
    a_images, a_questions = generate(5, 10, seed=3)
    b_images, b_questions = generate(5, 10, seed=3)
    c_images, _ = generate(5, 10, seed=4)
    assert np.array_equal(a_images, b_images) and a_questions == b_questions
    assert not np.array_equal(a_images, c_images)
    tokenizer = benchmark_tokenizer()
    spec = BenchmarkSpec(train_scenes=5, val_scenes=5, test_scenes=5)
    train, val = make_split(spec, "train", tokenizer), make_split(spec, "val", tokenizer)
    assert not np.array_equal(train.images, val.images)


def test_every_question_type_appears_and_answers_are_in_vocabulary():
    _, questions = generate(30, 10, seed=0)
    assert {q.qtype for q in questions} == set(QUESTION_TYPES)
    assert all(q.answer in ANSWERS for q in questions)
    assert {q.relational for q in questions} == {True, False}


def test_split_batches_have_the_documented_shapes():
    tokenizer = benchmark_tokenizer()
    split = make_split(BenchmarkSpec(train_scenes=4, val_scenes=4, test_scenes=4), "test", tokenizer)
    batch = split.batch(torch.arange(6))
    assert batch["input_ids"].shape == (6, 16) and batch["attention_mask"].shape == (6, 16)
    assert batch["pixel_values"].shape == (6, 3, 48, 48) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].shape == (6,) and batch["qtype"].shape == (6,)
    assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
    sizes = [b["labels"].shape[0] for b in split.batches(7)]
    assert sum(sizes) == len(split)


def test_bad_generation_arguments_are_named():
    with pytest.raises(ValueError, match="num_scenes"):
        generate(0, 10, seed=0)
    with pytest.raises(ValueError, match="unknown question types"):
        generate(1, 1, seed=0, qtypes=("colour_of_sky",))
    with pytest.raises(ValueError, match="max_objects"):
        SceneSpec(grid=3, cell=8, min_objects=2, max_objects=7)


def test_tokenizer_round_trip_unknown_words_and_truncation(tmp_path):
    tokenizer = benchmark_tokenizer()
    ids, mask = encode_questions(tokenizer, ["What SHAPE is the red object?", "is the plaid object on the left ?"], 16)
    words = [tokenizer.id_to_token(i) for i in ids[0][mask[0].bool()].tolist()]
    assert words == ["[CLS]", "what", "shape", "is", "the", "red", "object", "?", "[SEP]"]
    assert tokenizer.token_to_id(UNK) in ids[1].tolist()  # "plaid" is not in the vocabulary
    long_ids, long_mask = encode_questions(tokenizer, ["red " * 40], 8)
    assert long_mask.sum() == 8 and tokenizer.id_to_token(int(long_ids[0, -1])) == "[SEP]"
    save_tokenizer(tokenizer, tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert torch.equal(encode_questions(reloaded, ["is there a red circle ?"], 16)[0], encode_questions(tokenizer, ["is there a red circle ?"], 16)[0])
    counted = build_tokenizer_from_texts(["a b b", "b c"], min_count=2)
    assert counted.token_to_id("b") is not None and counted.token_to_id("a") is None
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path / "missing")


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "RGB"])
def test_decode_converts_any_colour_mode_to_rgb(mode):
    image = Image.new(mode, (20, 30))
    array = decode_image(_encode(image), size=48)
    assert array.shape == (48, 48, 3) and array.dtype == np.uint8


def test_decode_rejects_bad_bytes_with_a_reason():
    png = _encode(Image.new("RGB", (64, 64), (200, 10, 10)))
    with pytest.raises(ValueError, match="not a recognised image"):
        decode_image(b"definitely not an image", size=48)
    with pytest.raises(ValueError, match="empty"):
        decode_image(b"", size=48)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        decode_image(png[: len(png) // 2], size=48)
    with pytest.raises(ValueError, match="over the limit"):
        decode_image(png, size=48, max_pixels=1000)


def test_pixels_are_scaled_to_minus_one_one():
    images = np.array([[[[0, 255, 127]]]], dtype=np.uint8)
    pixels = pixels_from_uint8(images)
    assert pixels.shape == (1, 3, 1, 1)
    assert torch.allclose(pixels.flatten(), torch.tensor([-1.0, 1.0, 127 / 127.5 - 1]))
    with pytest.raises(ValueError, match="uint8"):
        pixels_from_uint8(np.zeros((1, 4, 4, 3), dtype=np.float32))
