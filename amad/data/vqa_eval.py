"""VQA's own metric: soft accuracy against the 10 human answers, with the official answer normalisation.

The official evaluation (``vqaEval.py`` of the VQA API, GT-Vision-Lab) scores a predicted answer
``a`` on a question with ``n`` human answers as the mean, over the ``n`` leave-one-out subsets of
``n - 1`` humans, of ``min(1, #humans in the subset who said a / 3)``. Before matching, the
prediction goes through :func:`normalize_prediction` (punctuation, then number words, articles
and contractions); the human answers go through :func:`strip_punctuation` only, and only when they
disagree. Both quirks are the official code's, kept so the numbers compare with published ones.

If ``m`` of the ``n`` humans gave ``a``, the leave-one-out mean has a closed form (used here):
``(m * min(1, (m - 1) / 3) + (n - m) * min(1, m / 3)) / n``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# The official tables (VQA API ``vqaEval.py``).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The official pattern, including its no-op "(?!<=" (a typo for a look-behind): a period not followed by a digit.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def strip_punctuation(text: str) -> str:
    """The official ``processPunctuation``: a mark next to a space (or any mark in a text with a
    ``1,000``-style number) is deleted, otherwise replaced by a space; periods not before a digit go."""
    out = text
    delete_all = _DIGIT_COMMA.search(text) is not None
    for mark in _PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def normalize_words(text: str) -> str:
    """The official ``processDigitArticle``: lower case, number words to digits, no articles, contractions."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_prediction(answer: str) -> str:
    """How the official evaluation normalises a predicted answer before matching."""
    return normalize_words(strip_punctuation(_clean(answer)))


def human_answer_forms(answers: Sequence[str]) -> list[str]:
    """How the official evaluation normalises one question's human answers (only when they disagree)."""
    cleaned = [_clean(answer) for answer in answers]
    if len(set(cleaned)) > 1:
        return [strip_punctuation(answer) for answer in cleaned]
    return cleaned


def leave_one_out_accuracy(matches: int, annotators: int) -> float:
    """Mean over the ``annotators`` leave-one-out subsets of ``min(1, matches in the subset / 3)``."""
    if annotators < 1:
        return 0.0
    m = matches
    return (m * min(1.0, (m - 1) / 3) + (annotators - m) * min(1.0, m / 3)) / annotators


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """The official VQA accuracy of one predicted answer on one question, in ``[0, 1]``."""
    forms = human_answer_forms(human_answers)
    predicted = normalize_prediction(prediction)
    return leave_one_out_accuracy(sum(form == predicted for form in forms), len(forms))


@dataclass
class HumanAnswers:
    """Per question, which of a model's answer labels the humans gave and how often.

    ``index`` ``(N, K)`` long: label indices (``-1`` padding); ``count`` ``(N, K)`` long: humans whose
    answer matches that label under the official normalisation; ``annotators`` ``(N,)`` long: how
    many human answers the question has (10 in VQA-v2). Human answers that match no label are only
    counted in ``annotators``: no prediction of the model can match them.
    """

    index: torch.Tensor
    count: torch.Tensor
    annotators: torch.Tensor

    @classmethod
    def build(cls, per_question: Sequence[Sequence[str]], labels: Sequence[str]) -> "HumanAnswers":
        """From each question's raw human answers and the model's ``labels`` (its ``id2label``)."""
        by_form: dict[str, list[int]] = {}
        for index, label in enumerate(labels):
            by_form.setdefault(normalize_prediction(label), []).append(index)
        rows = []
        for answers in per_question:
            counts = Counter(human_answer_forms(answers))
            rows.append([(index, n) for form, n in counts.items() for index in by_form.get(form, ())])
        width = max(1, max((len(row) for row in rows), default=1))
        index = torch.full((len(rows), width), -1, dtype=torch.long)
        count = torch.zeros((len(rows), width), dtype=torch.long)
        for row, pairs in enumerate(rows):
            for column, (label, n) in enumerate(pairs):
                index[row, column], count[row, column] = label, n
        annotators = torch.tensor([len(answers) for answers in per_question], dtype=torch.long)
        return cls(index, count, annotators)

    def __getitem__(self, rows: torch.Tensor) -> "HumanAnswers":
        return HumanAnswers(self.index[rows], self.count[rows], self.annotators[rows])

    def matches(self, predictions: torch.Tensor) -> torch.Tensor:
        """``(N,)`` long: how many humans gave each predicted label ``(N,)``."""
        return (self.count * (self.index == predictions[:, None])).sum(dim=1)

    def accuracy(self, predictions: torch.Tensor) -> torch.Tensor:
        """``(N,)`` float: the official VQA accuracy of each predicted label."""
        m = self.matches(predictions).float()
        n = self.annotators.float().clamp(min=1)
        return (m * ((m - 1) / 3).clamp(0, 1) + (n - m) * (m / 3).clamp(max=1)) / n

    def soft_targets(self, num_labels: int) -> torch.Tensor:
        """``(N, A)`` float: ViLT's training target, ``min(1, 0.3 * humans who gave the label)``."""
        targets = torch.zeros(self.index.shape[0], num_labels)
        present = self.index >= 0
        rows = torch.arange(self.index.shape[0])[:, None].expand_as(self.index)
        targets[rows[present], self.index[present]] = (0.3 * self.count[present].float()).clamp(max=1.0)
        return targets
