"""The encoder-decoder family: ``transformers.VisionEncoderDecoderModel``, a ViT encoder and a BERT decoder
with cross-attention, for image captioning (issue 24; the paper's VL-T5 and BLIP are of this kind).

Three attention kinds reach distillation (:class:`amad.outputs.VLOutputs`), one map per layer each:

* ``encoder_self``: ``(B, H, P+1, P+1)`` over the image's CLS and patches; every row and key is real.
* ``decoder_self``: ``(B, H, T, T)`` over the caption tokens, **causal**. Query rows that predict no
  token (padding, and the input ``[SEP]``, whose label is -100) are masked (``query_masks``); the upper
  triangle and padding keys hold exact zeros in both the teacher's and the student's maps (masked
  softmax), so they add nothing to a cosine similarity or a divergence.
* ``cross``: ``(B, H, T, P+1)``, caption tokens attending to the image; the same query rows masked.

Logits are per token, ``(B, T, V)``, with ``logit_mask`` ``(B, T)`` marking the positions with a token
to predict (``labels != -100``; without labels, the real input tokens).

Trap (seen here with transformers 5.x): under the default ``sdpa`` attention, ``output_attentions=True``
returns **empty tuples** and only logs a warning. Every model here is built and loaded with the eager
implementation, and :meth:`VedAdapter.forward` raises when a map it was asked for is missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

from amad.models import StudentSpec, sincos_2d
from amad.outputs import VLOutputs

KINDS = ("encoder_self", "decoder_self", "cross")
# The config attribute recording a pruned captioner's per-layer shapes (see amad/pruning_ved.py); saved in
# config.json, so loading builds the pruned shapes before reading the weights.
PRUNING_KEY = "amad_pruning"


def encoder_layers(model) -> list[nn.Module]:
    return list(model.encoder.layers)


def decoder_layers(model) -> list[nn.Module]:
    return list(model.decoder.bert.encoder.layer)


def check_pruning_record(config: VisionEncoderDecoderConfig, record: dict) -> None:
    """ValueError naming the problem when ``record`` does not fit ``config`` (layer counts, head indices, widths)."""
    try:
        encoder, decoder = record["encoder"], record["decoder"]
        parts = {"encoder": (encoder["teacher_layers"], {"heads": encoder["heads"]}, encoder["intermediate_sizes"], config.encoder),
                 "decoder": (decoder["teacher_layers"], {"self_heads": decoder["self_heads"], "cross_heads": decoder["cross_heads"]},
                             decoder["intermediate_sizes"], config.decoder)}
    except (KeyError, TypeError) as err:
        raise ValueError(f"{PRUNING_KEY} needs 'encoder' (teacher_layers, heads, intermediate_sizes) and 'decoder' (teacher_layers, "
                         f"self_heads, cross_heads, intermediate_sizes) ({err!r})") from None
    for stack, (teacher_layers, head_lists, widths, part) in parts.items():
        layers = part.num_hidden_layers
        lengths = [len(teacher_layers), len(widths), *(len(v) for v in head_lists.values())]
        if set(lengths) != {layers}:
            raise ValueError(f"{PRUNING_KEY}.{stack} describes {lengths} layers but its num_hidden_layers={layers}")
        for key, lists in head_lists.items():
            for index, kept in enumerate(lists):
                if not kept or len(set(kept)) != len(kept) or not all(0 <= int(h) < part.num_attention_heads for h in kept):
                    raise ValueError(f"{PRUNING_KEY}.{stack}.{key}[{index}]={kept}: need distinct head indices in [0, {part.num_attention_heads})")
        if any(int(n) < 1 for n in widths):
            raise ValueError(f"{PRUNING_KEY}.{stack}.intermediate_sizes={widths}: every FFN needs at least one neuron")


class AmadVisionEncoderDecoder(VisionEncoderDecoderModel):
    """``VisionEncoderDecoderModel`` whose config may carry ``amad_pruning``: each layer is built with its own
    head counts (encoder, decoder self, cross) and FFN width, so a pruned captioner saves and loads like any.

    The ViT encoder's pooler is removed: the decoder reads the encoder's hidden states, never the pooled
    vector, so the pooler's weights took no part in any loss (dead parameters, and DDP refuses parameters
    that get no gradient). A captioner saved with one loads without it.
    """

    def __init__(self, config: VisionEncoderDecoderConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.encoder.pooler = None
        record = getattr(config, PRUNING_KEY, None)
        if record:
            _apply_pruned_shapes(self, config, record)


def _linear_like(module: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=module.bias is not None)


def _apply_pruned_shapes(model: AmadVisionEncoderDecoder, config: VisionEncoderDecoderConfig, record: dict) -> None:
    check_pruning_record(config, record)
    enc, dec = config.encoder, config.decoder
    enc_dim, dec_dim = enc.hidden_size // enc.num_attention_heads, dec.hidden_size // dec.num_attention_heads
    for layer, kept, width in zip(encoder_layers(model), record["encoder"]["heads"], record["encoder"]["intermediate_sizes"]):
        attention, inner = layer.attention, len(kept) * enc_dim
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attention, name, _linear_like(getattr(attention, name), enc.hidden_size, inner))
        attention.o_proj = _linear_like(attention.o_proj, inner, enc.hidden_size)
        attention.num_attention_heads = len(kept)
        layer.mlp.fc1 = _linear_like(layer.mlp.fc1, enc.hidden_size, width)
        layer.mlp.fc2 = _linear_like(layer.mlp.fc2, width, enc.hidden_size)
    decoder = record["decoder"]
    for layer, self_kept, cross_kept, width in zip(decoder_layers(model), decoder["self_heads"], decoder["cross_heads"], decoder["intermediate_sizes"]):
        for block, kept in ((layer.attention, self_kept), (layer.crossattention, cross_kept)):
            inner = len(kept) * dec_dim
            attention = block.self
            attention.query = nn.Linear(dec.hidden_size, inner)
            attention.key = nn.Linear(attention.key.in_features, inner)
            attention.value = nn.Linear(attention.value.in_features, inner)
            attention.num_attention_heads, attention.all_head_size = len(kept), inner
            block.output.dense = nn.Linear(inner, dec.hidden_size)
        layer.intermediate.dense = nn.Linear(dec.hidden_size, width)
        layer.output.dense = nn.Linear(width, dec.hidden_size)
    for module in list(model.encoder.modules()) + list(model.decoder.modules()):
        if isinstance(module, nn.Linear):
            model._init_weights(module)




def _eager(config: VisionEncoderDecoderConfig) -> VisionEncoderDecoderConfig:
    for part in (config, config.encoder, config.decoder):
        part._attn_implementation = "eager"
    return config


def check_ved_config(config) -> None:
    """ValueError naming the key when ``config`` is not a ViT-encoder / BERT-decoder captioner with cross-attention."""
    if not isinstance(config, VisionEncoderDecoderConfig) or not hasattr(config, "encoder") or not hasattr(config, "decoder"):
        raise ValueError(f"family 'ved' needs a VisionEncoderDecoderConfig (model_type 'vision-encoder-decoder'); got {type(config).__name__}")
    if config.encoder.model_type != "vit" or config.decoder.model_type != "bert":
        raise ValueError(f"family 'ved' supports a 'vit' encoder and a 'bert' decoder; this config has encoder "
                         f"{config.encoder.model_type!r} and decoder {config.decoder.model_type!r}")
    if not getattr(config.decoder, "add_cross_attention", False) or not getattr(config.decoder, "is_decoder", False):
        raise ValueError("decoder.add_cross_attention and decoder.is_decoder must both be true: a decoder without "
                         "cross-attention cannot see the image (and has no 'cross' maps to distil)")
    if any(getattr(config, key, None) is None for key in ("decoder_start_token_id", "pad_token_id", "eos_token_id")):
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
    def build(config: VisionEncoderDecoderConfig, seed: int | None = None) -> "AmadVisionEncoderDecoder":
        """A randomly initialised captioner (reproducible with ``seed``); image position embeddings start as a
        2D sin-cos grid (as for ViLT: where a patch is is readable from the first step)."""
        check_ved_config(config)
        _eager(config)
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            model = AmadVisionEncoderDecoder(config)
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
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type != VisionEncoderDecoderConfig.model_type:
            raise ValueError(f"{path}/config.json: model_type {model_type!r} is not a captioner ('{VisionEncoderDecoderConfig.model_type}'): "
                             "family 'ved' loads VisionEncoderDecoder models")
        config = VisionEncoderDecoderConfig.from_pretrained(str(path))
        try:
            check_ved_config(config)
            if getattr(config, PRUNING_KEY, None):
                check_pruning_record(config, getattr(config, PRUNING_KEY))
        except ValueError as err:
            raise ValueError(f"{path}/config.json: {err}") from None
        model, info = AmadVisionEncoderDecoder.from_pretrained(str(path), config=_eager(config), ignore_mismatched_sizes=True,
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
        tokens = batch["decoder_attention_mask"].bool()  # (B, T) real input tokens: the keys
        # positions with a next token to predict: the input [SEP] is real but predicts nothing the teacher
        # learned, so it takes no part in logit KD or in the decoder's query rows
        predicting = batch["labels"] != -100 if "labels" in batch else tokens
        attentions, query_masks, key_masks = {}, {}, {}
        if need_attentions:
            maps = {"encoder_self": out.encoder_attentions, "decoder_self": out.decoder_attentions, "cross": out.cross_attentions}
            for kind, layers in maps.items():
                if not layers:
                    raise ValueError(f"the model returned no {kind!r} attention maps: it must run with eager attention "
                                     f"(attn_implementation='eager'; sdpa returns none and only warns)")
                attentions[kind] = list(layers)
            image_tokens = torch.ones(tokens.shape[0], attentions["encoder_self"][0].shape[-1], dtype=torch.bool, device=tokens.device)
            query_masks = {"encoder_self": image_tokens, "decoder_self": predicting, "cross": predicting}
            key_masks = {"encoder_self": image_tokens, "decoder_self": tokens, "cross": image_tokens}
        return VLOutputs(out.logits, attentions, query_masks, key_masks, logit_mask=predicting)

    @staticmethod
    def generate(model: VisionEncoderDecoderModel, pixel_values: torch.Tensor, *, max_length: int, num_beams: int = 1) -> torch.Tensor:
        """Captions ``(B, <= max_length)`` token ids, starting with the start token: greedy (``num_beams=1``) or beam search."""
        if max_length < 2 or num_beams < 1:
            raise ValueError(f"max_length={max_length} must be >= 2 and num_beams={num_beams} >= 1")
        with torch.no_grad():
            return model.generate(pixel_values=pixel_values, max_length=max_length, num_beams=num_beams, do_sample=False,
                                  early_stopping=True if num_beams > 1 else False)
