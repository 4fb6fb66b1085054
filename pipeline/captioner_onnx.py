"""A captioner as two ONNX graphs, and greedy and beam-search captioning over ONNX Runtime sessions in numpy.

No maintained exporter handles ``VisionEncoderDecoderModel`` with transformers 5 (optimum-onnx needs
transformers < 4.58), so the two halves are exported with ``torch.onnx`` (FIELD-NOTES):

- ``encoder.onnx``: ``pixel_values`` ``(B, 3, S, S)`` float32 -> ``encoder_hidden_states`` ``(B, P+1, D)``
  (the encoder's last hidden states, projected to the decoder's width where the model has a projection);
- ``decoder.onnx``: ``input_ids`` ``(B, T)`` int64 and ``encoder_hidden_states`` -> ``logits`` ``(B, T, V)``;
  ``B`` and ``T`` are dynamic. No key/value cache: captions are at most ~18 tokens, so each step runs
  the decoder over the whole prefix.

:class:`OnnxCaptioner` decodes greedily as ``generate`` does with ``num_beams=1`` (and with beam search as
``generate(num_beams=k, early_stopping=True)``, :meth:`OnnxCaptioner.beam`): every row starts with
the decoder start token, takes the arg-max token of its last position, and once it has produced the
end token is continued with padding until every row has ended or ``max_length`` tokens are written.
:func:`parity` is the export gate: the same greedy captions, token for token, and the largest
difference of teacher-forced logits.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

ENCODER_FILE, DECODER_FILE = "encoder.onnx", "decoder.onnx"
PIXELS, INPUT_IDS, HIDDEN, LOGITS = "pixel_values", "input_ids", "encoder_hidden_states", "logits"


class EncoderGraph(nn.Module):
    """``pixel_values -> encoder_hidden_states`` as the decoder reads them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.model.encoder(pixel_values=pixel_values).last_hidden_state
        projection = getattr(self.model, "enc_to_dec_proj", None)  # only when the encoder and decoder widths differ
        return projection(hidden) if projection is not None else hidden


class DecoderGraph(nn.Module):
    """``(input_ids, encoder_hidden_states) -> logits`` of every position (no padding: ``generate`` passes no mask)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.model.decoder(input_ids=input_ids, encoder_hidden_states=encoder_hidden_states, use_cache=False).logits


def _export(wrapper: nn.Module, args: tuple, path: Path, names: tuple[list[str], list[str]], axes: dict, exporter: str, opset: int) -> None:
    """One graph to ``path`` (via a ``.partial`` file: a failed export leaves nothing), checked by ``onnx.checker``."""
    import onnx

    partial = path.with_name(path.name + ".partial")
    inputs, outputs = names
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter; the checker and the parity gate judge the result
        if exporter == "dynamo":
            dims = {name: {axis: torch.export.Dim(f"{name}_{label}" if label != "batch" else "batch", min=1) for axis, label in spec.items()}
                    for name, spec in axes.items() if name in inputs}
            torch.onnx.export(wrapper, args, str(partial), input_names=inputs, output_names=outputs, dynamic_shapes=dims,
                              opset_version=opset, dynamo=True, external_data=False, verbose=False)
        else:
            torch.onnx.export(wrapper, args, str(partial), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                              opset_version=min(opset, 17), dynamo=False)
    onnx.checker.check_model(str(partial), full_check=True)
    os.replace(partial, path)


def export_captioner(model: nn.Module, directory: str | Path, pixel_values: torch.Tensor, *, exporter: str = "torchscript",
                     opset: int = 18) -> tuple[Path, Path]:
    """Export ``model`` (a :class:`transformers.VisionEncoderDecoderModel`) as ``encoder.onnx`` and ``decoder.onnx``
    in ``directory``; ``pixel_values`` ``(B >= 2, 3, S, S)`` is the example. Returns both paths."""
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"exporter={exporter!r} must be 'dynamo' or 'torchscript'")
    if pixel_values.shape[0] < 2:
        raise ValueError("the export example needs at least 2 images (a size-1 batch would be specialised)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    encoder, decoder = EncoderGraph(model).eval(), DecoderGraph(model).eval()  # eval: the legacy exporter restores training mode otherwise
    with torch.no_grad():
        hidden = encoder(pixel_values)
    start = int(model.config.decoder_start_token_id)
    input_ids = torch.full((pixel_values.shape[0], 3), start, dtype=torch.long)  # T > 1: the text axis stays dynamic
    _export(encoder, (pixel_values,), directory / ENCODER_FILE, ([PIXELS], [HIDDEN]),
            {PIXELS: {0: "batch"}, HIDDEN: {0: "batch"}}, exporter, opset)
    _export(decoder, (input_ids, hidden), directory / DECODER_FILE, ([INPUT_IDS, HIDDEN], [LOGITS]),
            {INPUT_IDS: {0: "batch", 1: "tokens"}, HIDDEN: {0: "batch"}, LOGITS: {0: "batch", 1: "tokens"}}, exporter, opset)
    return directory / ENCODER_FILE, directory / DECODER_FILE


@dataclass(frozen=True)
class TokenIds:
    """The special tokens decoding needs, from the model's config."""

    start: int
    end: int
    pad: int

    @staticmethod
    def of(config) -> "TokenIds":
        return TokenIds(int(config.decoder_start_token_id), int(config.eos_token_id), int(config.pad_token_id))


class OnnxCaptioner:
    """Captioning with an encoder and a decoder ONNX Runtime session (numpy in, numpy out)."""

    def __init__(self, encoder_session, decoder_session, tokens: TokenIds):
        self.encoder, self.decoder, self.tokens = encoder_session, decoder_session, tokens

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """``(B, 3, S, S)`` float32 -> ``(B, P+1, D)``."""
        return self.encoder.run([HIDDEN], {PIXELS: np.ascontiguousarray(pixel_values, dtype=np.float32)})[0]

    def logits(self, input_ids: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        """``(B, T)`` token ids and ``(B, P+1, D)`` -> ``(B, T, V)``."""
        return self.decoder.run([LOGITS], {INPUT_IDS: np.ascontiguousarray(input_ids, dtype=np.int64), HIDDEN: hidden})[0]

    def greedy(self, pixel_values: np.ndarray, max_length: int) -> np.ndarray:
        """Token ids ``(B, <= max_length)`` starting with the start token, as ``generate(num_beams=1)`` writes them."""
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be >= 2 (the start token and at least one more)")
        hidden = self.encode(pixel_values)
        rows = hidden.shape[0]
        ids = np.full((rows, 1), self.tokens.start, dtype=np.int64)
        unfinished = np.ones(rows, dtype=bool)
        while ids.shape[1] < max_length:
            following = self.logits(ids, hidden)[:, -1].argmax(axis=-1)
            following = np.where(unfinished, following, self.tokens.pad)
            ids = np.concatenate([ids, following[:, None]], axis=1)
            unfinished &= following != self.tokens.end
            if not unfinished.any():
                break
        return ids

    def greedy_retiring(self, hidden: np.ndarray, max_lengths: list[int]) -> list[list[int]]:
        """Greedy captions of ``B`` encoded images ``(B, P+1, D)``, each with its own ``max_lengths[i]`` (>= 2):
        token ids from the start token up to and including the end token (or cut at the row's length).

        The serving loop: a row leaves the batch as soon as it has ended, so each later decoder call runs
        only the rows still writing (one image's caption does not cost the others' steps). The decoder
        reads no other row, so every row's ids are :meth:`greedy`'s for that row alone."""
        if len(max_lengths) != hidden.shape[0]:
            raise ValueError(f"{hidden.shape[0]} encoded images but {len(max_lengths)} max_lengths")
        if any(length < 2 for length in max_lengths):
            raise ValueError(f"every max_length must be >= 2 (the start token and at least one more), got {max_lengths}")
        limits = np.asarray(max_lengths, dtype=np.int64)
        captions: list[list[int]] = [[] for _ in max_lengths]
        rows = np.arange(hidden.shape[0])  # the images still writing, in the order of ``ids``
        ids = np.full((len(rows), 1), self.tokens.start, dtype=np.int64)
        while len(rows):
            following = self.logits(ids, hidden)[:, -1].argmax(axis=-1)
            ids = np.concatenate([ids, following[:, None]], axis=1)
            done = (following == self.tokens.end) | (ids.shape[1] >= limits[rows])
            for position in np.flatnonzero(done):
                captions[rows[position]] = ids[position].tolist()
            keep = ~done
            rows, ids, hidden = rows[keep], ids[keep], hidden[keep]
        return captions

    def beam(self, pixel_values: np.ndarray, max_length: int, num_beams: int, length_penalty: float = 1.0) -> np.ndarray:
        """The best of ``num_beams`` beams per image ``(B, <= max_length)``, as ``generate(num_beams=k,
        early_stopping=True)`` finds it (transformers 5's vectorised beam search, redone in numpy).

        Each step keeps the ``2k`` best continuations of all beams by summed log-probability; those ending in
        the end token (or reaching ``max_length``) compete for the ``k`` finished slots with their score divided
        by their generated length ** ``length_penalty``; the others continue as the next ``k`` beams. An image is
        done once its ``k`` finished slots are full (``early_stopping=True``) or no running beam can still beat
        its worst finished one. Rows are filled after their end as ``generate`` fills them (with the end token
        when the padding id is 0).
        """
        if max_length < 2 or num_beams < 1:
            raise ValueError(f"max_length={max_length} must be >= 2 and num_beams={num_beams} >= 1")
        if num_beams == 1:
            return self.greedy(pixel_values, max_length)
        return self.beam_encoded(self.encode(pixel_values), max_length, num_beams, length_penalty)

    def beam_encoded(self, encoded: np.ndarray, max_length: int, num_beams: int, length_penalty: float = 1.0) -> np.ndarray:
        """:meth:`beam` on images already encoded ``(B, P+1, D)`` (``num_beams`` >= 2)."""
        return beam_search(WholePrefix(self, np.repeat(encoded, num_beams, axis=0)), encoded.shape[0], self.tokens, max_length,
                           num_beams, length_penalty)


class WholePrefix:
    """The beam search's decoder: every running beam's whole prefix at every step (``decoder.onnx``)."""

    def __init__(self, captioner: OnnxCaptioner, hidden: np.ndarray):
        self.captioner, self.hidden = captioner, hidden  # (B*k, P+1, D): beams of an image are adjacent

    def next_logits(self, prefixes: np.ndarray) -> np.ndarray:
        """``(B*k, T)`` running prefixes -> ``(B*k, V)`` logits of their next token."""
        return self.captioner.logits(prefixes, self.hidden)[:, -1]

    def reorder(self, rows: np.ndarray) -> None:
        """The next running beams continue rows ``rows`` ``(B*k,)`` (of the same images): nothing is carried here."""


def beam_search(decoder, batch: int, tokens: TokenIds, max_length: int, num_beams: int, length_penalty: float = 1.0) -> np.ndarray:
    """The best of ``num_beams`` beams for each of ``batch`` images ``(batch, <= max_length)``, as :meth:`OnnxCaptioner.beam`
    describes; ``decoder`` gives the next-token logits of the running prefixes and carries whatever it caches along
    with the beams it is told continue (:class:`WholePrefix`, or the cached decoder's)."""
    if max_length < 2 or num_beams < 2:
        raise ValueError(f"max_length={max_length} must be >= 2 and num_beams={num_beams} >= 2")
    k, big = num_beams, np.float32(1.0e9)
    keep = 2 * k  # max(2, 1 + number of end tokens) * k
    top_k_mask = np.arange(keep) < k
    fill = tokens.pad or tokens.end  # generate's fill value: `pad_token_id or eos_token_id`
    running = np.full((batch, k, max_length), fill, dtype=np.int64)
    running[:, :, 0] = tokens.start
    finished_ids = running.copy()
    running_scores = np.zeros((batch, k), dtype=np.float32)
    running_scores[:, 1:] = -big  # all beams start identical: only the first may expand at step one
    finished_scores = np.full((batch, k), -big, dtype=np.float32)
    finished = np.zeros((batch, k), dtype=bool)
    lengths_running = np.zeros((batch, k), dtype=np.int64)  # generated tokens of each running beam
    lengths_finished = np.zeros((batch, k), dtype=np.int64)
    can_improve = np.ones((batch, 1), dtype=bool)
    length = 1
    while True:
        logits = decoder.next_logits(running[:, :, :length].reshape(batch * k, length)).astype(np.float32)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))  # log_softmax in float32
        vocab = log_probs.shape[-1]
        totals = (log_probs.reshape(batch, k, vocab) + running_scores[:, :, None]).reshape(batch, k * vocab)
        order = np.argsort(-totals, axis=1, kind="stable")[:, :keep]  # (batch, 2k) best continuations
        top_scores = np.take_along_axis(totals, order, axis=1)
        parents, new_tokens = order // vocab, order % vocab
        candidates = np.take_along_axis(running, parents[:, :, None], axis=1)  # (batch, 2k, max_length)
        candidates[:, :, length] = new_tokens
        candidate_lengths = np.take_along_axis(lengths_running, parents, axis=1) + 1
        ends = (new_tokens == tokens.end) | (length + 1 >= max_length)
        # the next running beams: the best k that did not end
        continuing = top_scores - ends.astype(np.float32) * big
        chosen = np.argsort(-continuing, axis=1, kind="stable")[:, :k]
        running = np.take_along_axis(candidates, chosen[:, :, None], axis=1)
        decoder.reorder((np.arange(batch)[:, None] * k + np.take_along_axis(parents, chosen, axis=1)).reshape(-1))
        running_scores = np.take_along_axis(continuing, chosen, axis=1)
        lengths_running = np.take_along_axis(candidate_lengths, chosen, axis=1)
        # the finished slots: the best k of those kept and those that just ended among the top k
        just_ended = ends & top_k_mask[None, :]
        scores = top_scores / np.float32(length ** length_penalty)
        scores = scores - (np.all(finished, axis=1, keepdims=True)).astype(np.float32) * big
        scores = scores - (~can_improve).astype(np.float32) * big
        scores = scores - (~just_ended).astype(np.float32) * big
        merged_ids = np.concatenate([finished_ids, candidates], axis=1)
        merged_scores = np.concatenate([finished_scores, scores], axis=1)
        merged_finished = np.concatenate([finished, just_ended], axis=1)
        merged_lengths = np.concatenate([lengths_finished, candidate_lengths], axis=1)
        best = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
        finished_ids = np.take_along_axis(merged_ids, best[:, :, None], axis=1)
        finished_scores = np.take_along_axis(merged_scores, best, axis=1)
        finished = np.take_along_axis(merged_finished, best, axis=1)
        lengths_finished = np.take_along_axis(merged_lengths, best, axis=1)
        length += 1
        best_running = running_scores[:, :1] / np.float32((length - 1) ** length_penalty)
        worst_finished = np.where(finished, finished_scores.min(axis=1, keepdims=True), -big)
        can_improve &= np.any(best_running > worst_finished, axis=-1, keepdims=True)
        if not (can_improve.any() and not finished.all() and not ends.all()):
            break
    # generate's output length: the start token plus the longest best sequence's generated tokens
    return finished_ids[:, 0, : 1 + int(lengths_finished[:, 0].max())]


def parity(model: nn.Module, captioner: OnnxCaptioner, pixel_values: torch.Tensor, max_length: int, batch_size: int = 64) -> dict:
    """The export gate's figures on ``pixel_values`` ``(N, 3, S, S)``: the share of images whose greedy caption
    (token ids) is identical in PyTorch ``generate`` and over ONNX Runtime, and the largest absolute logit
    difference on teacher-forced steps (PyTorch's greedy captions fed to both decoders)."""
    from amad.models_ved import VedAdapter

    identical, images, largest = 0, 0, 0.0
    for start in range(0, len(pixel_values), batch_size):
        pixels = pixel_values[start:start + batch_size]
        expected = VedAdapter.generate(model, pixels, max_length=max_length)  # (B, T)
        got = captioner.greedy(pixels.numpy(), max_length)
        for row in range(len(pixels)):
            want = expected[row].tolist()
            have = got[row].tolist() if row < len(got) else []
            # generate pads every row to the batch's longest; compare without the padding after the end token
            identical += caption_ids(want, captioner.tokens) == caption_ids(have, captioner.tokens)
        images += len(pixels)
        with torch.no_grad():
            hidden = EncoderGraph(model)(pixels)
            reference = DecoderGraph(model)(expected, hidden).numpy()
        onnx_logits = captioner.logits(expected.numpy(), captioner.encode(pixels.numpy()))
        largest = max(largest, float(np.abs(reference - onnx_logits).max()))
    return {"images": images, "identical_greedy": identical / max(1, images), "max_abs_logit_diff": largest}


def caption_ids(ids: list[int], tokens: TokenIds) -> list[int]:
    """A caption's ids up to and including its end token (what a batch adds after it -- padding, or the end
    token again where beam search fills with it -- dropped)."""
    return ids[: ids.index(tokens.end) + 1] if tokens.end in ids else [i for i in ids if i != tokens.pad]
