"""A captioner's decoder with past key/values: one token per step instead of the whole prefix.

:mod:`pipeline.captioner_onnx`'s ``decoder.onnx`` runs the decoder over every token written so far at each
step (no cache), so a caption of ``T`` tokens costs ``T`` decoder passes over prefixes of length 1..T.
Here the decoder is exported as two graphs that carry the attention keys and values between steps:

- ``cross_kv.onnx``: ``encoder_hidden_states`` ``(B, P+1, D)`` -> per decoder layer ``l`` the cross-attention
  keys and values ``cross_k_l``, ``cross_v_l`` ``(B, Hc_l, P+1, d)``: computed once per image;
- ``decoder_step.onnx``: ``input_ids`` ``(B, 1)``, ``position`` ``(1,)`` (the new token's index), per layer the
  self-attention keys and values so far ``past_k_l``, ``past_v_l`` ``(B, Hs_l, T, d)`` and the cross ones ->
  ``logits`` ``(B, V)`` of the new token and ``present_k_l``, ``present_v_l`` ``(B, Hs_l, T+1, d)``.

:class:`DecoderStep` is the BERT decoder layer (self-attention, cross-attention, FFN, each with its residual
LayerNorm), written out for one new token over cached keys and values; head counts come from each layer's
own modules, so a pruned captioner (different heads per layer) exports alike. No attention mask is needed:
``generate`` passes none, every row of a batch has the same length, and the only keys are the past ones
and the token's own (causality holds by construction). :class:`CachedCaptioner` decodes greedily over the
two graphs, retiring rows as they end, and must write exactly :meth:`OnnxCaptioner.greedy_retiring`'s ids;
its beam search is :func:`pipeline.captioner_onnx.beam_search` with the caches following the beams.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

CROSS_FILE, STEP_FILE = "cross_kv.onnx", "decoder_step.onnx"


def _layers(model: nn.Module) -> list[nn.Module]:
    return list(model.decoder.bert.encoder.layer)


def _heads(attention: nn.Module) -> tuple[int, int]:
    """``(heads, head size)`` of one (possibly pruned) BERT attention block."""
    return int(attention.num_attention_heads), int(attention.attention_head_size)


class CrossKeyValues(nn.Module):
    """``encoder_hidden_states`` -> ``(cross_k_0, cross_v_0, cross_k_1, ...)``, each ``(B, Hc_l, P+1, d)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(layer.crossattention.self for layer in _layers(model))

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = []
        for block in self.blocks:
            heads, size = _heads(block)
            for projection in (block.key, block.value):
                out.append(projection(hidden).view(hidden.shape[0], hidden.shape[1], heads, size).transpose(1, 2))
        return tuple(out)


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``(B, H, 1, d)`` over ``(B, H, K, d)`` -> ``(B, 1, H*d)``: eager attention, as BERT's (scaled by sqrt(d))."""
    scores = torch.matmul(query, keys.transpose(-1, -2)) / math.sqrt(query.shape[-1])
    context = torch.matmul(torch.softmax(scores, dim=-1), values)  # (B, H, 1, d)
    return context.transpose(1, 2).reshape(query.shape[0], 1, -1)


class DecoderStep(nn.Module):
    """One decoding step of the BERT decoder over cached keys and values (module doc)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.embeddings = model.decoder.bert.embeddings
        self.layers = nn.ModuleList(_layers(model))
        self.head = model.decoder.cls

    def forward(self, input_ids: torch.Tensor, position: torch.Tensor, *caches: torch.Tensor):
        """``caches``: per layer ``past_k, past_v`` then, after all of them, per layer ``cross_k, cross_v``."""
        count = len(self.layers)
        past, cross = caches[: 2 * count], caches[2 * count:]
        embeddings = self.embeddings
        positions = position.view(1, 1).expand(input_ids.shape[0], 1)
        hidden = embeddings.word_embeddings(input_ids) + embeddings.token_type_embeddings(torch.zeros_like(input_ids)) \
            + embeddings.position_embeddings(positions)
        hidden = embeddings.LayerNorm(hidden)  # (B, 1, D)
        presents = []
        for index, layer in enumerate(self.layers):
            block = layer.attention.self
            heads, size = _heads(block)

            def split(x: torch.Tensor, heads=heads, size=size) -> torch.Tensor:
                return x.view(x.shape[0], 1, heads, size).transpose(1, 2)  # (B, H, 1, d)

            keys = torch.cat([past[2 * index], split(block.key(hidden))], dim=2)
            values = torch.cat([past[2 * index + 1], split(block.value(hidden))], dim=2)
            presents += [keys, values]
            attended = layer.attention.output.dense(_attend(split(block.query(hidden)), keys, values))
            hidden = layer.attention.output.LayerNorm(attended + hidden)
            cross_block = layer.crossattention.self
            cross_heads, cross_size = _heads(cross_block)
            query = cross_block.query(hidden).view(hidden.shape[0], 1, cross_heads, cross_size).transpose(1, 2)
            attended = layer.crossattention.output.dense(_attend(query, cross[2 * index], cross[2 * index + 1]))
            hidden = layer.crossattention.output.LayerNorm(attended + hidden)
            inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(hidden))
            hidden = layer.output.LayerNorm(layer.output.dense(inner) + hidden)
        logits = self.head(hidden)[:, 0]  # (B, V)
        return (logits, *presents)


def cache_names(model: nn.Module) -> tuple[list[str], list[str], list[str]]:
    """Input and output names: ``(past, cross, present)``, two per decoder layer each."""
    count = len(_layers(model))
    past = [f"past_{kind}_{i}" for i in range(count) for kind in ("k", "v")]
    cross = [f"cross_{kind}_{i}" for i in range(count) for kind in ("k", "v")]
    present = [f"present_{kind}_{i}" for i in range(count) for kind in ("k", "v")]
    return past, cross, present


def export_cached_decoder(model: nn.Module, directory: str | Path, hidden: torch.Tensor, opset: int = 17) -> tuple[Path, Path]:
    """``cross_kv.onnx`` and ``decoder_step.onnx`` of ``model`` (eval) into ``directory`` (TorchScript exporter);
    ``hidden`` ``(B>=2, P+1, D)``: example encoder states. Each file is checked by ``onnx.checker``."""
    import onnx

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    past_names, cross_names, present_names = cache_names(model)
    cross_module, step_module = CrossKeyValues(model).eval(), DecoderStep(model).eval()
    batch = {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cross = cross_module(hidden)
        cross_path = directory / CROSS_FILE
        torch.onnx.export(cross_module, (hidden,), str(cross_path), input_names=["encoder_hidden_states"], output_names=cross_names,
                          dynamic_axes={"encoder_hidden_states": {0: "batch", 1: "patches"}, **{n: {0: "batch", 2: "patches"} for n in cross_names}},
                          opset_version=opset, dynamo=False)
        rows = hidden.shape[0]
        ids = torch.full((rows, 1), int(model.config.decoder_start_token_id), dtype=torch.long)
        past = []
        for layer in _layers(model):  # one token already cached, so the traced concatenation sees a real past
            heads, size = _heads(layer.attention.self)
            past += [torch.zeros(rows, heads, 1, size), torch.zeros(rows, heads, 1, size)]
        step_path = directory / STEP_FILE
        axes = {"input_ids": batch, **{n: {0: "batch", 2: "past"} for n in past_names}, **{n: {0: "batch", 2: "patches"} for n in cross_names},
                "logits": batch, **{n: {0: "batch", 2: "total"} for n in present_names}}
        torch.onnx.export(step_module, (ids, torch.tensor([1]), *past, *cross), str(step_path),
                          input_names=["input_ids", "position", *past_names, *cross_names], output_names=["logits", *present_names],
                          dynamic_axes=axes, opset_version=opset, dynamo=False)
    for path in (cross_path, step_path):
        onnx.checker.check_model(str(path), full_check=True)
    return cross_path, step_path


class CachedBeams:
    """The beam search's decoder over the cache: the last token of each running beam per step; the self-attention
    keys and values follow the beams that continue (:func:`pipeline.captioner_onnx.beam_search`)."""

    def __init__(self, captioner: "CachedCaptioner", hidden: np.ndarray):
        """``hidden`` ``(B*k, P+1, D)``: each image's encoder states once per beam, beams of an image adjacent."""
        self.captioner = captioner
        self.cross = captioner.cross.run(None, {"encoder_hidden_states": np.ascontiguousarray(hidden, dtype=np.float32)})
        self.past = captioner.empty_past(hidden.shape[0])

    def next_logits(self, prefixes: np.ndarray) -> np.ndarray:
        logits, self.past = self.captioner.step_logits(prefixes[:, -1:], prefixes.shape[1] - 1, self.past, self.cross)
        return logits

    def reorder(self, rows: np.ndarray) -> None:
        self.past = [cache[rows] for cache in self.past]  # cross keys and values are the image's: the same for its beams


class CachedCaptioner:
    """Greedy captioning over the encoder graph and the cached decoder's two graphs (numpy in, numpy out)."""

    def __init__(self, encoder_session, cross_session, step_session, tokens, heads: list[tuple[int, int]]):
        """``heads``: per decoder layer ``(self-attention heads, head size)`` (an empty past needs its shape)."""
        self.encoder, self.cross, self.step, self.tokens, self.heads = encoder_session, cross_session, step_session, tokens, heads
        self.layers = len(heads)

    @staticmethod
    def heads_of(model: nn.Module) -> list[tuple[int, int]]:
        return [_heads(layer.attention.self) for layer in _layers(model)]

    def empty_past(self, rows: int) -> list[np.ndarray]:
        return [np.zeros((rows, heads, 0, size), dtype=np.float32) for heads, size in self.heads for _ in (0, 1)]

    def step_logits(self, ids: np.ndarray, position: int, past: list[np.ndarray], cross: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step: ``ids`` ``(B, 1)`` at ``position`` over ``past`` -> ``(B, V)`` logits and the grown cache."""
        names = [f"past_{kind}_{i}" for i in range(self.layers) for kind in ("k", "v")]
        cross_names = [f"cross_{kind}_{i}" for i in range(self.layers) for kind in ("k", "v")]
        logits, *present = self.step.run(None, {"input_ids": np.ascontiguousarray(ids, dtype=np.int64), "position": np.asarray([position], dtype=np.int64),
                                                **dict(zip(names, past)), **dict(zip(cross_names, cross))})
        return logits, present

    def beam_encoded(self, encoded: np.ndarray, max_length: int, num_beams: int, length_penalty: float = 1.0) -> np.ndarray:
        """Beam search as :meth:`pipeline.captioner_onnx.OnnxCaptioner.beam_encoded` (``generate``'s), over the cache."""
        from pipeline.captioner_onnx import beam_search

        return beam_search(CachedBeams(self, np.repeat(encoded, num_beams, axis=0)), encoded.shape[0], self.tokens, max_length,
                           num_beams, length_penalty)

    def greedy_retiring(self, hidden: np.ndarray, max_lengths: list[int]) -> list[list[int]]:
        """As :meth:`pipeline.captioner_onnx.OnnxCaptioner.greedy_retiring`, one token per decoder call."""
        if len(max_lengths) != hidden.shape[0] or any(length < 2 for length in max_lengths):
            raise ValueError(f"need one max_length >= 2 per encoded image, got {max_lengths} for {hidden.shape[0]} images")
        limits = np.asarray(max_lengths, dtype=np.int64)
        captions: list[list[int]] = [[] for _ in max_lengths]
        cross = self.cross.run(None, {"encoder_hidden_states": np.ascontiguousarray(hidden, dtype=np.float32)})
        rows = np.arange(hidden.shape[0])
        ids = np.full((len(rows), 1), self.tokens.start, dtype=np.int64)
        past = self.empty_past(len(rows))
        while len(rows):
            logits, past = self.step_logits(ids[:, -1:], ids.shape[1] - 1, past, cross)
            following = logits.argmax(axis=-1)
            ids = np.concatenate([ids, following[:, None]], axis=1)
            done = (following == self.tokens.end) | (ids.shape[1] >= limits[rows])
            for position in np.flatnonzero(done):
                captions[rows[position]] = ids[position].tolist()
            keep = ~done
            rows, ids = rows[keep], ids[keep]
            past, cross = [p[keep] for p in past], [c[keep] for c in cross]
        return captions


def cached_parity(model: nn.Module, cached: CachedCaptioner, pixel_values: torch.Tensor, max_length: int, batch_size: int = 64) -> dict:
    """The cached decoder's export gate on ``pixel_values`` ``(N, 3, S, S)``: the share of images whose greedy caption
    is ``generate``'s token for token, and the largest absolute difference between its per-step logits and the
    PyTorch decoder's over the whole prefix, teacher-forced on ``generate``'s captions (padding included)."""
    from amad.models_ved import VedAdapter
    from pipeline.captioner_onnx import DecoderGraph, EncoderGraph, caption_ids

    identical, images, largest = 0, 0, 0.0
    for start in range(0, len(pixel_values), batch_size):
        pixels = pixel_values[start:start + batch_size]
        expected = VedAdapter.generate(model, pixels, max_length=max_length)  # (B, T)
        hidden = cached.encoder.run(None, {"pixel_values": pixels.numpy()})[0]
        got = cached.greedy_retiring(hidden, [max_length] * len(pixels))
        identical += sum(caption_ids(want, cached.tokens) == have for want, have in zip(expected.tolist(), got))
        images += len(pixels)
        with torch.no_grad():
            reference = DecoderGraph(model)(expected, EncoderGraph(model)(pixels)).numpy()  # (B, T, V)
        cross = cached.cross.run(None, {"encoder_hidden_states": hidden})
        past = cached.empty_past(len(pixels))
        ids = expected.numpy()
        for position in range(ids.shape[1]):
            logits, past = cached.step_logits(ids[:, position:position + 1], position, past, cross)
            largest = max(largest, float(np.abs(reference[:, position] - logits).max()))
    return {"images": images, "identical_greedy": identical / max(1, images), "max_abs_logit_diff": largest}
