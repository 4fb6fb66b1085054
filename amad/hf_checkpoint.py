"""Hugging Face ViLT checkpoints written and read the way ``transformers`` does, with nothing from a hub.

A user's teacher is a directory as ``ViltForQuestionAnswering.save_pretrained`` and
``ViltProcessor.save_pretrained`` write it (``config.json``, ``model.safetensors``,
``processor_config.json`` or, from older versions, ``preprocessor_config.json``; the tokenizer files). :func:`check_vilt_checkpoint` says, before any
weight is read, whether a directory is one; :func:`write_vilt_checkpoint` builds such a directory
locally (a stock model from a config, a WordPiece tokenizer trained with ``tokenizers``), for tests,
benchmarks and users who want to try the path without a download.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from amad.data.preprocess import PROCESSOR_FILES, is_checkpoint_processor

VQA_ARCHITECTURE = "ViltForQuestionAnswering"


def train_wordpiece(texts: Iterable[str], vocab_size: int = 1000):
    """A lower-casing BERT WordPiece tokenizer (``BertTokenizerFast``) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
    from tokenizers.models import WordPiece
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(list(texts), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return BertTokenizerFast(tokenizer_object=tokenizer, do_lower_case=True)


def write_vilt_checkpoint(directory: str | Path, config, tokenizer, image_processor=None, *, seed: int = 0) -> Path:
    """Save a randomly initialised stock ``ViltForQuestionAnswering`` of ``config`` with a ``ViltProcessor``.

    ``config.vocab_size`` is set to the tokenizer's; ``image_processor`` defaults to ViLT's own
    (shortest edge ``config.image_size``, ``size_divisor`` = the patch size). Position embeddings
    and the image CLS token are drawn at random (stock ViLT starts them at zero), so a test that
    compares two implementations sees them. Returns ``directory``.
    """
    import torch
    from transformers import ViltForQuestionAnswering, ViltProcessor
    from transformers.models.vilt.image_processing_pil_vilt import ViltImageProcessorPil

    directory = Path(directory)
    config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    if image_processor is None:
        image_processor = ViltImageProcessorPil(size={"shortest_edge": config.image_size}, size_divisor=config.patch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViltForQuestionAnswering(config).eval()
        with torch.no_grad():
            model.vilt.embeddings.position_embeddings.normal_(std=config.initializer_range)
            model.vilt.embeddings.cls_token.normal_(std=config.initializer_range)
    model.save_pretrained(directory)
    ViltProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def check_vilt_checkpoint(directory: str | Path) -> dict:
    """The ``config.json`` of a Hugging Face ViLT VQA checkpoint directory; ValueError naming the problem.

    Reads small files only: the config (a ViLT with a VQA classifier and labels), the processor's
    config, and that weights and tokenizer files exist.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such directory")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{directory}: no config.json (not a saved Hugging Face model)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from None
    if config.get("model_type") != "vilt":
        raise ValueError(f"{config_file}: model_type is {config.get('model_type')!r}; a teacher must be a ViLT ('vilt')")
    architectures = config.get("architectures") or []
    if architectures and VQA_ARCHITECTURE not in architectures and "AmadViltForQuestionAnswering" not in architectures:
        raise ValueError(f"{config_file}: architectures {architectures} has no question-answering head ({VQA_ARCHITECTURE})")
    labels = config.get("id2label") or {}
    if len(labels) < 2:
        raise ValueError(f"{config_file}: id2label has {len(labels)} answers; a VQA classifier needs its answer labels")
    if not any((directory / name).is_file() for name in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")):
        raise ValueError(f"{directory}: no weights (model.safetensors)")
    if not is_checkpoint_processor(directory):
        raise ValueError(f"{directory}: no {' or '.join(PROCESSOR_FILES)} (save the checkpoint's ViltProcessor there)")
    if not any((directory / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise ValueError(f"{directory}: no tokenizer files (tokenizer.json or vocab.txt; save the ViltProcessor there)")
    return config
