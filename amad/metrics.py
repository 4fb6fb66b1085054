"""Caption metrics: BLEU-1..4, ROUGE-L and CIDEr-D, as the COCO caption evaluation computes them.

Written here because the usual sources do not fit a machine without Java or a hub: pycocoevalcap needs
Java for its PTB tokenizer, torchmetrics has no CIDEr, ``evaluate`` fetches its scripts at run time.
The numbers equal the COCO scorers' (``pycocoevalcap`` ``Bleu(4)``, ``Rouge()``, ``Cider()``) on the
same pre-tokenised text; ``tests/test_metrics.py`` pins hand-computed cases and a corpus scored by them.

Text is lower-cased and split on whitespace (our captions are generated word sequences, so this *is*
their tokenisation; COCO's PTB tokenizer would also strip punctuation). Per scorer, following the
COCO code (Papineni et al. 2002; Lin 2004; Vedantam et al. 2015):

* **BLEU-n** (corpus level): clipped n-gram matches and candidate n-gram counts summed over all images,
  geometric mean of the 1..n precisions, brevity penalty ``exp(1 - r / c)`` when ``c < r``, where ``c``
  is the total candidate length and ``r`` the sum over images of the reference length *closest* to the
  candidate's (the shorter on a tie). The COCO code's smoothing constants (``1e-15`` added to matches,
  ``1e-9`` to counts and lengths) are kept, so a corpus without a matching 4-gram scores ~1e-5, not 0.
* **ROUGE-L**: per image, ``P`` and ``R`` are the best LCS precision and recall over the references
  (taken separately), ``F = (1 + b^2) P R / (R + b^2 P)`` with ``b = 1.2``; the corpus score is the mean.
* **CIDEr-D**: per n (1..4), TF-IDF vectors of n-gram counts with document frequencies over the
  reference sets of the images scored (``idf = log(images) - log(max(1, df))``), the candidate's
  weights clipped at the reference's, cosine similarity times the Gaussian length penalty
  ``exp(-delta^2 / (2 sigma^2))``, ``sigma = 6``, averaged over references and over n, times 10;
  the corpus score is the mean over images. ``delta`` is the difference of the two sentences' *bigram*
  counts, as in the COCO code (equal to the length difference unless a sentence is empty). With a single
  image every n-gram's IDF is 0 and CIDEr-D is 0, as there.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Mapping, Sequence

BLEU_ORDER = 4
ROUGE_BETA = 1.2
CIDER_SIGMA = 6.0
CIDER_SCALE = 10.0
_TINY, _SMALL = 1e-15, 1e-9  # the COCO BLEU code's smoothing of matches / counts and lengths
METRIC_KEYS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d")


def tokenize(text: str) -> list[str]:
    """Lower-cased, split on whitespace."""
    return text.lower().split()


def ngram_counts(words: Sequence[str], order: int = BLEU_ORDER) -> Counter:
    """Counts of every n-gram of ``words``, n = 1..order, keyed by the tuple of its words."""
    return Counter(tuple(words[i:i + n]) for n in range(1, order + 1) for i in range(len(words) - n + 1))


def _checked(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]) -> list[str]:
    """The image ids to score, after checking both mappings describe the same images with text."""
    if not isinstance(references, Mapping) or not isinstance(candidates, Mapping):
        raise TypeError("caption_scores takes two mappings: image id -> list of reference captions, image id -> candidate caption")
    missing = [key for key in references if key not in candidates]
    extra = [key for key in candidates if key not in references]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no candidate for {len(missing)} image(s) with references (e.g. {missing[0]!r})")
        if extra:
            parts.append(f"{len(extra)} candidate(s) for images without references (e.g. {extra[0]!r})")
        raise ValueError("references and candidates must name the same images: " + "; ".join(parts))
    if not references:
        raise ValueError("no images to score: references and candidates are empty")
    for key, refs in references.items():
        if isinstance(refs, str) or not isinstance(refs, Sequence) or not refs:
            raise ValueError(f"image {key!r}: references must be a non-empty list of captions (got {type(refs).__name__})")
        for ref in refs:
            if not isinstance(ref, str) or not ref.split():
                raise ValueError(f"image {key!r}: every reference must be a caption with at least one word (got {ref!r})")
        if not isinstance(candidates[key], str):
            raise ValueError(f"image {key!r}: the candidate must be one caption string (got {type(candidates[key]).__name__})")
    return list(references)


def bleu(references: list[list[list[str]]], candidates: list[list[str]], order: int = BLEU_ORDER) -> list[float]:
    """Corpus BLEU-1..``order`` of tokenised ``candidates[i]`` against ``references[i]`` (COCO's "closest" length)."""
    correct, guess = [0] * order, [0] * order
    test_length = ref_length = 0
    for refs, words in zip(references, candidates):
        max_ref_counts: Counter = Counter()
        for ref in refs:
            max_ref_counts |= ngram_counts(ref, order)  # | keeps the larger count of each n-gram
        for gram, count in ngram_counts(words, order).items():
            correct[len(gram) - 1] += min(count, max_ref_counts[gram])
        for n in range(1, order + 1):
            guess[n - 1] += max(0, len(words) - n + 1)
        test_length += len(words)
        ref_length += min((abs(len(ref) - len(words)), len(ref)) for ref in refs)[1]
    scores, product = [], 1.0
    for n in range(order):
        product *= (correct[n] + _TINY) / (guess[n] + _SMALL)
        scores.append(product ** (1.0 / (n + 1)))
    ratio = (test_length + _TINY) / (ref_length + _SMALL)
    if ratio < 1:
        scores = [score * math.exp(1 - 1 / ratio) for score in scores]
    return scores


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)))."""
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(refs: list[list[str]], words: list[str], beta: float = ROUGE_BETA) -> float:
    """ROUGE-L of one tokenised candidate against its references (best precision and best recall, then F_beta)."""
    if not words:
        return 0.0
    lcs = [lcs_length(ref, words) for ref in refs]
    precision = max(common / len(words) for common in lcs)
    recall = max(common / len(ref) for common, ref in zip(lcs, refs))
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)


def cider_d(references: list[list[list[str]]], candidates: list[list[str]], order: int = BLEU_ORDER,
            sigma: float = CIDER_SIGMA) -> list[float]:
    """CIDEr-D of each tokenised candidate (document frequencies over these images' reference sets)."""
    ref_counts = [[ngram_counts(ref, order) for ref in refs] for refs in references]
    document_frequency: Counter = Counter()
    for counts in ref_counts:
        document_frequency.update({gram for count in counts for gram in count})
    log_images = math.log(len(references))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        weights: list[dict] = [{} for _ in range(order)]
        norms = [0.0] * order
        for gram, frequency in counts.items():
            n = len(gram) - 1
            weight = frequency * (log_images - math.log(max(1.0, document_frequency[gram])))
            weights[n][gram] = weight
            norms[n] += weight * weight
        bigrams = sum(f for gram, f in counts.items() if len(gram) == 2)  # COCO's "length": see the module doc
        return weights, [math.sqrt(norm) for norm in norms], bigrams

    scores = []
    for words, counts in zip(candidates, ref_counts):
        hyp, hyp_norm, hyp_length = vector(ngram_counts(words, order))
        total = [0.0] * order
        for ref_count in counts:
            ref, ref_norm, ref_length = vector(ref_count)
            penalty = math.exp(-((hyp_length - ref_length) ** 2) / (2 * sigma ** 2))
            for n in range(order):
                value = sum(min(weight, ref[n].get(gram, 0.0)) * ref[n].get(gram, 0.0) for gram, weight in hyp[n].items())
                if hyp_norm[n] != 0 and ref_norm[n] != 0:
                    value /= hyp_norm[n] * ref_norm[n]
                total[n] += value * penalty
        scores.append(sum(total) / order / len(counts) * CIDER_SCALE)
    return scores


def caption_scores(references: dict[str, list[str]], candidates: dict[str, str]) -> dict[str, float]:
    """Corpus scores of one candidate caption per image against that image's references.

    ``references``: image id -> reference captions (at least one, each with a word); ``candidates``:
    image id -> one caption (may be empty), for exactly the same ids. Returns ``bleu_1`` ... ``bleu_4``,
    ``rouge_l`` and ``cider_d`` (COCO's scale: CIDEr-D is x10, so 0..~10; the others 0..1).
    ValueError names the image when the inputs do not fit.
    """
    ids = _checked(references, candidates)
    refs = [[tokenize(ref) for ref in references[key]] for key in ids]
    cands = [tokenize(candidates[key]) for key in ids]
    bleus = bleu(refs, cands)
    scores = {f"bleu_{n + 1}": bleus[n] for n in range(BLEU_ORDER)}
    scores["rouge_l"] = sum(rouge_l(r, c) for r, c in zip(refs, cands)) / len(ids)
    scores["cider_d"] = sum(cider_d(refs, cands)) / len(ids)
    return scores
