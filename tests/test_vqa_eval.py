"""VQA's soft accuracy and answer normalisation, against a literal transcription of the official loop."""

from __future__ import annotations

import random

import pytest
import torch

from amad.data.vqa_eval import (
    HumanAnswers,
    human_answer_forms,
    leave_one_out_accuracy,
    normalize_prediction,
    strip_punctuation,
    vqa_accuracy,
)


def official_accuracy(prediction: str, humans: list[str]) -> float:
    """The official evaluation's per-question loop, written out as it is (leave each human out in turn)."""
    predicted = normalize_prediction(prediction)
    forms = human_answer_forms(humans)
    scores = []
    for left_out in range(len(forms)):
        others = forms[:left_out] + forms[left_out + 1 :]
        scores.append(min(1.0, sum(form == predicted for form in others) / 3))
    return sum(scores) / len(scores)


@pytest.mark.parametrize("raw, normal", [
    ("Two", "2"), ("two dogs", "2 dogs"), ("A dog.", "dog"), ("the red one", "red 1"), ("yes!", "yes"),
    ("dont", "don't"), ("1,000", "1000"), ("t-shirt", "t shirt"), ("3.5", "3.5"), ("  no\t", "no"), ("none", "0"),
])
def test_predictions_are_normalised_as_the_official_evaluation_does(raw, normal):
    assert normalize_prediction(raw) == normal


def test_human_answers_only_lose_punctuation_and_only_when_they_disagree():
    assert human_answer_forms(["Two!"] * 10) == ["Two!"] * 10
    assert human_answer_forms(["two!", "2"]) == ["two ", "2"]  # the official code keeps the space it made
    assert strip_punctuation("left, right") == "left right"


@pytest.mark.parametrize("agree, expected", [(10, 1.0), (4, 1.0), (3, 0.9), (2, 0.6), (1, 0.3), (0, 0.0)])
def test_soft_accuracy_by_number_of_agreeing_humans(agree, expected):
    humans = ["2"] * agree + ["3"] * (10 - agree)
    assert vqa_accuracy("two", humans) == pytest.approx(expected)
    assert leave_one_out_accuracy(agree, 10) == pytest.approx(expected)


def test_label_accuracy_matches_the_official_loop_on_random_answers():
    rng = random.Random(0)
    pool = ["yes", "no", "2", "two", "red", "Red.", "a dog", "dog", "t-shirt", "tshirt", "none", "0"]
    labels = ("yes", "no", "2", "red", "dog", "t shirt", "0", "blue")
    questions = [[rng.choice(pool) for _ in range(rng.choice([10, 10, 9, 3]))] for _ in range(300)]
    humans = HumanAnswers.build(questions, labels)
    for label_index, label in enumerate(labels):
        predictions = torch.full((len(questions),), label_index)
        got = humans.accuracy(predictions)
        expected = torch.tensor([official_accuracy(label, answers) for answers in questions])
        assert torch.allclose(got, expected, atol=1e-6), label
    assert humans.annotators.tolist() == [len(q) for q in questions]


def test_soft_targets_are_vilts_scores_and_rows_follow_indexing():
    humans = HumanAnswers.build([["yes"] * 10, ["2"] * 3 + ["3"] * 7, ["cat"] * 10], ("no", "yes", "2", "3"))
    targets = humans.soft_targets(4)
    assert targets.tolist() == [[0, 1, 0, 0], [0, 0, pytest.approx(0.9), 1], [0, 0, 0, 0]]
    assert humans[torch.tensor([2, 0])].soft_targets(4).tolist() == [[0, 0, 0, 0], [0, 1, 0, 0]]
    assert humans.accuracy(torch.tensor([1, 2, 0])).tolist() == [1.0, pytest.approx(0.9), 0.0]
