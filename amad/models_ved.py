"""The encoder-decoder family: ``transformers.VisionEncoderDecoderModel``, a ViT encoder and a BERT decoder
with cross-attention, for image captioning (issue 24; the paper's VL-T5 and BLIP are of this kind).

Three attention kinds reach distillation (:class:`amad.outputs.VLOutputs`), one map per layer each:

* ``encoder_self``: ``(B, H, P+1, P+1)`` over the image's CLS and patches; every row and key is real.
* ``decoder_self``: ``(B, H, T, T)`` over the caption tokens, **causal**. Padding query rows are
  masked (``query_masks``); the upper triangle and padding keys hold exact zeros in both the teacher's
  and the student's maps (masked softmax), so they add nothing to a cosine similarity or a divergence.
* ``cross``: ``(B, H, T, P+1)``, caption tokens attending to the image; padding query rows masked.

Logits are per token, ``(B, T, V)``, with ``logit_mask`` ``(B, T)`` marking real tokens.

Trap (seen here with transformers 5.x): under the default ``sdpa`` attention, ``output_attentions=True``
returns **empty tuples** and only logs a warning. Every model here is built and loaded with the eager
implementation, and :meth:`VedAdapter.forward` raises when a map it was asked for is missing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

from amad.models import StudentSpec, sincos_2d
from amad.outputs import VLOutputs

KINDS = ("encoder_self", "decoder_self", "cross")


def _eager(config: VisionEncoderDecoderConfig) -> VisionEncoderDecoderConfig:
    for part in (config, config.encoder, config.decoder):
        part._attn_implementation = "eager"
    return config


def check_ved_config(config) -> None:
    """ValueError naming the key when ``config`` is not a ViT-encoder / BERT-decoder captioner with cross-attention."""
    if not isinstance(config, VisionEncoderDecoderConfig):
        raise ValueError(f"family 'ved' needs a VisionEncoderDecoderConfig (model_type 'vision-encoder-decoder'); got {type(config).__name__}")
    if config.encoder.model_type != "vit" or config.decoder.model_type != "bert":
        raise ValueError(f"family 'ved' supports a 'vit' encoder and a 'bert' decoder; this config has encoder "
                         f"{config.encoder.model_type!r} and decoder {config.decoder.model_type!r}")
    if not getattr(config.decoder, "add_cross_attention", False) or not getattr(config.decoder, "is_decoder", False):
        raise ValueError("decoder.add_cross_attention and decoder.is_decoder must both be true: a decoder without "
                         "cross-attention cannot see the image (and has no 'cross' maps to distil)")
    if config.decoder_start_token_id is None or config.pad_token_id is None or config.eos_token_id is None:
        raise ValueError("decoder_start_token_id, pad_token_id and eos_token_id must be set in the config (generation needs them)")


class VedAdapter:
    """The VisionEncoderDecoder family: encoder self-attention, causal decoder self-attention, cross-attention."""

    family = "ved"
    kinds = KINDS

    @staticmethod
    def teacher_config(
        *,
        vocab_size: int,
        image_size: int,
        patch_size: int,
        max_caption_length: int,
        pad_token_id: int,
        bos_token_id: int,
        eos_token_id: int,
        hidden_size: int = 96,
        heads: int = 12,
        layers: int = 4,
        decoder_layers: int | None = None,
        intermediate_size: int | None = None,
        dropout: float = 0.0,
    ) -> VisionEncoderDecoderConfig:
        """A captioner for our data: ViT encoder (``layers``) and BERT decoder (``decoder_layers``, default
        ``layers``) of the same width and head count. ``bos_token_id`` starts every caption (``[CLS]``)."""
        if hidden_size % heads:
            raise ValueError(f"heads={heads} does not divide hidden_size={hidden_size}")
        if image_size % patch_size:
            raise ValueError(f"patch_size={patch_size} does not divide image_size={image_size}")
        common = dict(hidden_size=hidden_size, num_attention_heads=heads, intermediate_size=intermediate_size or 4 * hidden_size,
                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, initializer_range=hidden_size ** -0.5)
        encoder = ViTConfig(num_hidden_layers=layers, image_size=image_size, patch_size=patch_size, **common)
        decoder = BertConfig(vocab_size=vocab_size, num_hidden_layers=decoder_layers or layers, max_position_embeddings=max_caption_length,
                             is_decoder=True, add_cross_attention=True, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                             eos_token_id=eos_token_id, **common)
        config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
        config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = bos_token_id, pad_token_id, eos_token_id
        config.bos_token_id = bos_token_id
        return _eager(config)

    @staticmethod
    def student_config(teacher: VisionEncoderDecoderConfig, spec: StudentSpec) -> VisionEncoderDecoderConfig:
        """The teacher's captioner with ``spec.heads`` heads and ``spec.layers`` layers in the encoder and in the
        decoder (``hidden = heads * head_dim``, head_dim the teacher's unless given; the FFN keeps its ratio)."""
        check_ved_config(teacher)
        if spec.heads < 1 or spec.layers < 1:
            raise ValueError(f"student heads={spec.heads} and layers={spec.layers} must be >= 1")
        parts = []
        for part in (teacher.encoder, teacher.decoder):
            head_dim = spec.head_dim or part.hidden_size // part.num_attention_heads
            hidden = spec.heads * head_dim
            ratio = spec.intermediate_ratio or part.intermediate_size / part.hidden_size
            values = part.to_dict()
            values.update(hidden_size=hidden, num_attention_heads=spec.heads, num_hidden_layers=spec.layers,
                          intermediate_size=max(1, round(ratio * hidden)), initializer_range=hidden ** -0.5)
            for key in ("architectures", "transformers_version", "_name_or_path", "model_type"):
                values.pop(key, None)
            parts.append(type(part)(**values))
        config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(*parts)
        for key in ("decoder_start_token_id", "pad_token_id", "eos_token_id", "bos_token_id"):
            setattr(config, key, getattr(teacher, key))
        return _eager(config)

    @staticmethod
    def build(config: VisionEncoderDecoderConfig, seed: int | None = None) -> VisionEncoderDecoderModel:
        """A randomly initialised captioner (reproducible with ``seed``); image position embeddings start as a
        2D sin-cos grid (as for ViLT: where a patch is is readable from the first step)."""
        check_ved_config(config)
        _eager(config)
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            model = VisionEncoderDecoderModel(config=config)
        with torch.no_grad():
            positions = model.encoder.embeddings.position_embeddings  # (1, 1 + P, D)
            grid = round((positions.shape[1] - 1) ** 0.5)
            positions[0, 1:] = sincos_2d(grid, positions.shape[2])
        return model

    @staticmethod
    def load(path: str | Path) -> VisionEncoderDecoderModel:
        """Load a saved captioner (``config.json`` + ``model.safetensors``) with eager attention; ValueError
        naming the directory when it is not one or its weights do not fit its config."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} holds no config.json: not a saved model directory")
        config = VisionEncoderDecoderConfig.from_pretrained(str(path))
        try:
            check_ved_config(config)
        except ValueError as err:
            raise ValueError(f"{path}/config.json: {err}") from None
        model, info = VisionEncoderDecoderModel.from_pretrained(str(path), config=_eager(config), ignore_mismatched_sizes=True,
                                                                output_loading_info=True)
        problems = [f"{name}: saved {tuple(saved)}, config.json builds {tuple(built)}" for name, saved, built in sorted(info["mismatched_keys"])]
        problems += [f"{name}: not in the saved weights" for name in sorted(info["missing_keys"])]
        if problems:
            raise ValueError(f"{path}: the weights in model.safetensors do not fit config.json ({'; '.join(problems[:6])})")
        return model

    @staticmethod
    def heads(model: nn.Module) -> dict[str, int]:
        """Heads per stack: ``{"encoder": ..., "decoder": ...}``."""
        return {"encoder": model.config.encoder.num_attention_heads, "decoder": model.config.decoder.num_attention_heads}

    @staticmethod
    def layers(model: nn.Module) -> dict[str, int]:
        return {"encoder": model.config.encoder.num_hidden_layers, "decoder": model.config.decoder.num_hidden_layers}

    @staticmethod
    def forward(model: VisionEncoderDecoderModel, batch: dict[str, torch.Tensor], *, need_attentions: bool = True,
                need_qkv: bool = False) -> VLOutputs:
        """Teacher-forced forward pass on a caption batch (:class:`amad.data.captions.CaptionTrainingSet`):
        ``pixel_values`` ``(B, 3, S, S)``, ``decoder_input_ids`` and ``decoder_attention_mask`` ``(B, T)``.

        Returns logits ``(B, T, V)``, ``logit_mask`` ``(B, T)`` and, with ``need_attentions``, the three kinds
        of maps (module doc) with their masks.
        """
        if need_qkv:
            raise ValueError("method 'relation' is not supported for the 'ved' family: its cross-attention relates "
                             "two sequences of different lengths (use amad, one_to_one or head_mean)")
        out = model(pixel_values=batch["pixel_values"], decoder_input_ids=batch["decoder_input_ids"],
                    decoder_attention_mask=batch["decoder_attention_mask"], output_attentions=need_attentions, return_dict=True)
        tokens = batch["decoder_attention_mask"].bool()  # (B, T)
        attentions, query_masks, key_masks = {}, {}, {}
        if need_attentions:
            maps = {"encoder_self": out.encoder_attentions, "decoder_self": out.decoder_attentions, "cross": out.cross_attentions}
            for kind, layers in maps.items():
                if not layers:
                    raise ValueError(f"the model returned no {kind!r} attention maps: it must run with eager attention "
                                     f"(attn_implementation='eager'; sdpa returns none and only warns)")
                attentions[kind] = list(layers)
            image_tokens = torch.ones(tokens.shape[0], attentions["encoder_self"][0].shape[-1], dtype=torch.bool, device=tokens.device)
            query_masks = {"encoder_self": image_tokens, "decoder_self": tokens, "cross": tokens}
            key_masks = {"encoder_self": image_tokens, "decoder_self": tokens, "cross": image_tokens}
        return VLOutputs(out.logits, attentions, query_masks, key_masks, logit_mask=tokens)

    @staticmethod
    def generate(model: VisionEncoderDecoderModel, pixel_values: torch.Tensor, *, max_length: int, num_beams: int = 1) -> torch.Tensor:
        """Captions ``(B, <= max_length)`` token ids, starting with the start token: greedy (``num_beams=1``) or beam search."""
        if max_length < 2 or num_beams < 1:
            raise ValueError(f"max_length={max_length} must be >= 2 and num_beams={num_beams} >= 1")
        with torch.no_grad():
            return model.generate(pixel_values=pixel_values, max_length=max_length, num_beams=num_beams, do_sample=False,
                                  early_stopping=True if num_beams > 1 else False)
