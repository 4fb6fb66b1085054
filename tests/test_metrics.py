"""amad.metrics.caption_scores: BLEU-1..4, ROUGE-L, CIDEr-D as the COCO caption evaluation computes them (issue 24).

Hand-computed cases (closed forms in the comments) pin each rule that distinguishes the COCO scorers
from other implementations; a small corpus pins the values the COCO scorers themselves gave.
"""

from __future__ import annotations

import math

import pytest

from amad.metrics import METRIC_KEYS, caption_scores, lcs_length

TOL = 1e-6
L2 = math.log(2)


def test_bleu_is_clipped_and_uses_the_closest_reference_length_the_shorter_on_a_tie():
    # "the the the" vs "the cat": unigram matches clipped at the reference's count, 1 of 3; the closest
    # reference length is 2 < 3, so no brevity penalty. BLEU-2: no bigram matches ("the the" x2).
    scores = caption_scores({"i": ["the cat"]}, {"i": "the the the"})
    assert scores["bleu_1"] == pytest.approx(1 / 3, abs=TOL)
    assert scores["bleu_2"] == pytest.approx(math.sqrt(1 / 3 * 1e-15 / 2), abs=TOL)  # COCO's smoothing: ~0, not exactly 0
    # a 4-word candidate between references of 3 and 5 words: r = 3 (the shorter of the two closest), no penalty;
    # taking 5 would give exp(1 - 5/4) = 0.78
    tie = caption_scores({"i": ["a b c", "a b c d e"]}, {"i": "a b c d"})
    assert tie["bleu_1"] == pytest.approx(1.0, abs=TOL)
    assert tie["bleu_2"] == pytest.approx(1.0, abs=TOL)


def test_bleu_brevity_penalty_and_corpus_sums():
    # "a red circle" vs one 8-word reference: every n-gram up to 3 matches (3/3, 2/2, 1/1), no 4-gram
    # (0 of 0: COCO's (0 + 1e-15) / (0 + 1e-9) = 1e-6), c = 3 < r = 8: penalty exp(1 - 8/3)
    scores = caption_scores({"i": ["a red circle left of a blue square"]}, {"i": "a red circle"})
    penalty = math.exp(1 - 8 / 3)
    assert scores["bleu_1"] == pytest.approx(penalty, abs=TOL)
    assert scores["bleu_3"] == pytest.approx(penalty, abs=TOL)
    assert scores["bleu_4"] == pytest.approx(1e-6 ** 0.25 * penalty, abs=TOL)
    # corpus level: matches and counts are summed over images before dividing (not a mean of per-image BLEU)
    corpus = caption_scores({"x": ["a b"], "y": ["c d e f"]}, {"x": "a b", "y": "c g h i"})
    assert corpus["bleu_1"] == pytest.approx((2 + 1) / (2 + 4), abs=TOL)  # per-image mean would be (1 + 1/4) / 2


def test_rouge_l_takes_the_best_precision_and_the_best_recall_separately_with_beta_1_2():
    assert lcs_length("a b c d".split(), "a c e".split()) == 2
    # one reference: LCS("a b c d", "a c e") = 2, P = 2/3, R = 2/4
    p, r = 2 / 3, 2 / 4
    assert caption_scores({"i": ["a b c d"]}, {"i": "a c e"})["rouge_l"] == pytest.approx((1 + 1.44) * p * r / (r + 1.44 * p), abs=TOL)
    # two references: the best precision (2/3 from either) and the best recall (2/2 from "a c"), combined
    p, r = 2 / 3, 1.0
    assert caption_scores({"i": ["a b c d", "a c"]}, {"i": "a c e"})["rouge_l"] == pytest.approx((1 + 1.44) * p * r / (r + 1.44 * p), abs=TOL)
    # an empty candidate scores 0; the corpus score is the mean over images
    assert caption_scores({"x": ["a b"], "y": ["c d"]}, {"x": "a b", "y": ""})["rouge_l"] == pytest.approx(0.5, abs=TOL)


def test_cider_d_tf_idf_cosine_with_clipping_length_penalty_and_x10():
    # two images, every reference n-gram in one image only: idf = log(2) - log(1) = log 2 for each.
    # "blue square" = its reference: cosine 1 for unigrams and bigrams, no 3- or 4-grams (0): (1 + 1 + 0 + 0) / 4 x 10 = 5
    # "red red circle" vs "red circle" (weights in units of log 2):
    #   unigrams hyp {red: 2, circle: 1}, ref {red: 1, circle: 1}; clipped dot = min(2,1)*1 + 1*1 = 2; norms sqrt(5), sqrt(2)
    #   bigrams hyp {red red: 1 (df 0 -> idf log 2 - log 1), red circle: 1}, ref {red circle: 1}: dot 1; norms sqrt(2), 1
    #   trigrams: the reference has none (norm 0): 0
    #   length penalty on the bigram counts 2 vs 1: exp(-1 / 72)
    refs = {"a": ["red circle"], "b": ["blue square"]}
    scores = caption_scores(refs, {"a": "red red circle", "b": "blue square"})
    first = (2 / math.sqrt(10) + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4 * 10
    assert scores["cider_d"] == pytest.approx((first + 5.0) / 2, abs=TOL)
    unclipped = (3 / math.sqrt(10) + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4 * 10  # plain CIDEr would give this
    assert abs(scores["cider_d"] - (unclipped + 5.0) / 2) > 0.1
    # several references: the mean over them
    two = caption_scores({"a": ["red circle", "blue square"], "b": ["green triangle"]}, {"a": "red circle", "b": "green triangle"})
    assert two["cider_d"] == pytest.approx(((5.0 + 0.0) / 2 + 5.0) / 2, abs=TOL)
    # one image: every idf is log 1 - log 1 = 0, so CIDEr-D is 0 whatever the caption
    assert caption_scores({"a": ["red circle"]}, {"a": "red circle"})["cider_d"] == 0.0


# Scored by the COCO caption evaluation's own scorers: pycocoevalcap 1.2 (PyPI), Bleu(4).compute_score(gts, res,
# verbose=0), Rouge().compute_score, Cider().compute_score, with gts = REFERENCES and res = {id: [candidate]},
# run on 2026-12-07 (its bleu/rouge/cider modules need no Java; it is not a dependency of this project).
REFERENCES = {
    "scene-0": ["a red circle left of a blue square", "a blue square right of a red circle", "a red circle and a blue square"],
    "scene-1": ["a green triangle at the top", "a green triangle above a yellow circle", "a yellow circle below a green triangle"],
    "scene-2": ["two blue squares", "a blue square left of a blue square"],
    "scene-3": ["a magenta circle at the bottom", "a magenta circle below a red square", "a red square above a magenta circle",
                "a red square and a magenta circle"],
    "scene-4": ["a cyan triangle right of an orange square"],
}
CANDIDATES = {
    "scene-0": "a red circle left of a blue square",
    "scene-1": "a green triangle above a circle",
    "scene-2": "a blue square left of a red circle",
    "scene-3": "a red square at the bottom",
    "scene-4": "an orange square",
}
COCO_SCORES = {"bleu_1": 0.7961388313166216, "bleu_2": 0.7571733526456457, "bleu_3": 0.7190315459016643,
               "bleu_4": 0.6668360778396283, "rouge_l": 0.7662493318531309, "cider_d": 3.882320014994504}


def test_a_corpus_scores_what_the_coco_scorers_gave_to_1e_6():
    scores = caption_scores(REFERENCES, CANDIDATES)
    assert set(scores) == set(METRIC_KEYS)
    for key, expected in COCO_SCORES.items():
        assert scores[key] == pytest.approx(expected, abs=TOL), key


def test_text_is_lower_cased_and_split_on_any_whitespace():
    shouted = {key: [ref.upper().replace(" ", "  \t") for ref in refs] for key, refs in REFERENCES.items()}
    assert caption_scores(shouted, {key: f" {text.title()}\n" for key, text in CANDIDATES.items()}) == caption_scores(REFERENCES, CANDIDATES)


@pytest.mark.parametrize(
    "references, candidates, message",
    [
        ({"a": ["x y"]}, {"b": "x"}, r"must name the same images: no candidate for 1 image\(s\) with references \(e.g. 'a'\); 1 candidate\(s\) for images without references \(e.g. 'b'\)"),
        ({}, {}, r"no images to score"),
        ({"a": []}, {"a": "x"}, r"image 'a': references must be a non-empty list of captions"),
        ({"a": "x y"}, {"a": "x"}, r"image 'a': references must be a non-empty list of captions \(got str\)"),
        ({"a": ["x", "  "]}, {"a": "x"}, r"image 'a': every reference must be a caption with at least one word \(got '  '\)"),
        ({"a": ["x"]}, {"a": ["x"]}, r"image 'a': the candidate must be one caption string \(got list\)"),
    ],
)
def test_inputs_that_do_not_fit_name_the_image(references, candidates, message):
    with pytest.raises(ValueError, match=message):
        caption_scores(references, candidates)
