"""A word-level tokenizer built locally with ``tokenizers`` (no hub), saved beside data and models.

Training, export checks and serving all encode questions through :func:`encode_questions`, so a
question becomes the same ids everywhere.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP)
TOKENIZER_FILE = "tokenizer.json"


def build_tokenizer(words: Iterable[str]) -> Tokenizer:
    """A lower-casing word-level tokenizer over ``words``; unknown words map to ``[UNK]``.

    Ids: the four special tokens first (``[PAD]`` is 0), then ``words`` in sorted order.
    """
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted(set(words) - set(SPECIAL_TOKENS)):
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", special_tokens=[(CLS, vocab[CLS]), (SEP, vocab[SEP])]
    )
    return tokenizer


def build_tokenizer_from_texts(texts: Iterable[str], min_count: int = 1) -> Tokenizer:
    """Vocabulary = the words seen at least ``min_count`` times in ``texts`` (e.g. training questions)."""
    splitter = build_tokenizer([])
    counts: Counter[str] = Counter()
    for text in texts:
        normal = splitter.normalizer.normalize_str(text)
        counts.update(word for word, _ in splitter.pre_tokenizer.pre_tokenize_str(normal))
    return build_tokenizer(word for word, n in counts.items() if n >= min_count)


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> Path:
    path = Path(directory) / TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def load_tokenizer(directory_or_file: str | Path) -> Tokenizer:
    path = Path(directory_or_file)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path} (expected a {TOKENIZER_FILE} saved by amad)")
    return Tokenizer.from_file(str(path))


def encode_questions(tokenizer: Tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Questions -> ``input_ids`` ``(N, max_length)`` long and ``attention_mask`` ``(N, max_length)`` long.

    Over-long questions keep their first ``max_length - 1`` tokens and the final ``[SEP]``.
    """
    if max_length < 3:
        raise ValueError(f"max_length={max_length} must be >= 3 ([CLS], a word, [SEP])")
    pad_id = tokenizer.token_to_id(PAD)
    sep_id = tokenizer.token_to_id(SEP)
    ids = np.full((len(texts), max_length), pad_id, dtype=np.int64)
    mask = np.zeros((len(texts), max_length), dtype=np.int64)
    for row, encoding in enumerate(tokenizer.encode_batch(texts)):
        tokens = encoding.ids
        if len(tokens) > max_length:
            tokens = tokens[: max_length - 1] + [sep_id]
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def count_words(tokenizer: Tokenizer, text: str) -> int:
    """Number of word tokens (without ``[CLS]``/``[SEP]``) ``text`` encodes to."""
    return len(tokenizer.encode(text, add_special_tokens=False).ids)
