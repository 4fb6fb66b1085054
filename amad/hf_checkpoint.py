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
import re
from collections.abc import Iterable
from pathlib import Path

from amad.data.preprocess import PROCESSOR_FILES, is_checkpoint_processor

VQA_ARCHITECTURE = "ViltForQuestionAnswering"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")  # owner/name, as the Hugging Face hub names repositories
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]  # config, weights, tokenizer and processor files; no other formats


def locate_teacher(value: str | Path) -> Path:
    """The local directory of a teacher given as a path or, when no such path exists, as a Hugging Face
    hub name (``owner/name``: downloaded once into the hub's cache with ``snapshot_download``, only the
    config, safetensors weights, tokenizer and processor files). A local path always wins.

    ValueError naming both readings when the value is neither an existing directory nor downloadable
    (no network, no such repository, ``HF_HUB_OFFLINE=1`` with nothing cached).
    """
    path = Path(value).expanduser()
    if path.exists() or not HUB_ID.match(str(value)):
        return path.resolve()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(value), allow_patterns=HUB_FILES))
    except Exception as err:  # network, authentication, missing repository: all end the same way for the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{value}: no such local directory ({path.resolve()}), and downloading it from the Hugging Face hub as a model "
            f"name failed ({type(err).__name__}: {reason}); give the directory the checkpoint was saved to"
        ) from None


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


def _wordpiece_twin(word_level):
    """A ``BertTokenizerFast`` that encodes exactly as this project's word-level ``tokenizers.Tokenizer``.

    Same vocabulary and ids, BERT's lower-casing normaliser and punctuation split (the word-level
    tokenizer's ``Whitespace`` splits the same way on ASCII text), ``[CLS] ... [SEP]``. Every word is a
    whole WordPiece token and there are no ``##`` pieces, so an unknown word is ``[UNK]`` in both.
    """
    return wordpiece_from_vocab(word_level.get_vocab())


def wordpiece_from_vocab(vocab: dict[str, int]):
    """A lower-casing BERT tokenizer (``BertTokenizerFast``) over exactly ``vocab`` (token -> id; needs
    ``[PAD]``, ``[UNK]``, ``[CLS]``, ``[SEP]``), e.g. a BERT-sized vocabulary for a real-sized model."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import BertTokenizerFast

    tokenizer = Tokenizer(WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    # no [MASK]: the teacher's embedding has exactly len(vocab) rows
    return BertTokenizerFast(tokenizer_object=tokenizer, do_lower_case=True, unk_token="[UNK]", pad_token="[PAD]",
                             cls_token="[CLS]", sep_token="[SEP]", mask_token=None)


def teacher_to_hf_checkpoint(teacher: str | Path, out: str | Path, *, check_questions: int = 64) -> dict:
    """Write a teacher saved by ``amad teacher`` as a stock Hugging Face ViLT VQA checkpoint.

    ``out`` gets what ``ViltForQuestionAnswering.save_pretrained`` and ``ViltProcessor.save_pretrained``
    write: the same weights under ``architectures: [ViltForQuestionAnswering]``, a BERT tokenizer with
    the teacher's vocabulary and ids, and a ``ViltImageProcessor`` (shortest edge = the teacher's image
    size, ``size_divisor`` = its patch size, mean = std = 0.5, i.e. the teacher's ``[-1, 1]`` pixels).
    Before anything is kept, the stock ``ViltForQuestionAnswering`` loaded from ``out`` with the stock
    processor must give the teacher's logits (max |diff| <= 1e-4) and tokens on ``check_questions``
    validation questions of the teacher's own data. ``out`` must not exist yet (nothing is overwritten);
    it is written next to itself and renamed into place. Returns the check's figures.
    ValueError naming the problem for a pruned teacher (stock ViLT has the same heads in every layer),
    a directory that is not a teacher, or a failed check.
    """
    import shutil
    import tempfile

    import torch
    from transformers import ViltForQuestionAnswering, ViltProcessor
    from transformers.models.vilt.image_processing_pil_vilt import ViltImageProcessorPil

    from amad.data.benchmark import BenchmarkSpec, split_scenes
    from amad.data.preprocess import load_preprocessor
    from amad.data.text import load_tokenizer
    from amad.models import PRUNING_KEY, ViltAdapter

    teacher, out = Path(teacher), Path(out)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "benchmark.json"):
        if not (teacher / name).is_file():
            raise ValueError(f"{teacher}: no {name} (not a teacher saved by `amad teacher`)")
    if out.exists():
        raise ValueError(f"{out} already exists: choose a new directory (nothing is overwritten)")
    if PRUNING_KEY in json.loads((teacher / "config.json").read_text()):
        raise ValueError(f"{teacher} is a pruned model ({PRUNING_KEY} in its config.json): stock ViLT needs the same heads in every layer")
    model = ViltAdapter.load(teacher).eval()
    config = model.config
    stock = ViltForQuestionAnswering(config)
    stock.load_state_dict(model.state_dict())
    stock.config.architectures = ["ViltForQuestionAnswering"]
    tokenizer = _wordpiece_twin(load_tokenizer(teacher))
    images = ViltImageProcessorPil(size={"shortest_edge": config.image_size}, size_divisor=config.patch_size,
                                   image_mean=[0.5] * 3, image_std=[0.5] * 3)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        stock.save_pretrained(staging)
        ViltProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(staging)
        # the gate: stock classes and processor against the teacher's own pre-processing, on its validation questions
        spec = BenchmarkSpec.from_dict(json.loads((teacher / "benchmark.json").read_text()))
        scenes, questions = split_scenes(spec, "val", max_scenes=check_questions)
        questions = questions[:check_questions]
        texts = [q.text for q in questions]
        pictures = [scenes[q.scene] for q in questions]
        ours = load_preprocessor(teacher)
        input_ids, attention_mask = ours.encode(texts)
        processor = ViltProcessor.from_pretrained(str(staging))
        encoded = processor.tokenizer(texts, padding="max_length", truncation=True, max_length=input_ids.shape[1], return_tensors="pt")
        same_tokens = torch.equal(encoded["input_ids"], input_ids)
        pixels = processor.image_processor(images=pictures, return_tensors="pt")
        reloaded = ViltForQuestionAnswering.from_pretrained(str(staging)).eval()
        with torch.no_grad():
            expected = model(input_ids=input_ids, attention_mask=attention_mask, **ours.pixels(pictures)).logits
            got = reloaded(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"],
                           pixel_values=pixels["pixel_values"], pixel_mask=pixels["pixel_mask"]).logits
        diff = float((expected - got).abs().max())
        if not same_tokens or diff > 1e-4:
            raise ValueError(f"{teacher}: the converted checkpoint does not reproduce the teacher (same tokens: {same_tokens}, "
                             f"max |logit diff| {diff:.2e} > 1e-4); nothing written")
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return {"questions": len(questions), "max_abs_logit_diff": diff, "same_tokens": same_tokens, "answers": len(config.id2label)}
