"""The captioner behind ``POST /v1/caption``: two ONNX Runtime sessions, the tokenizer, batched decoding.

:class:`CaptionPredictor` is plain Python (no Ray), like :class:`serving.model.Predictor`: the Serve
deployment calls :meth:`CaptionPredictor.caption` per batch, tests call it directly. It reads a
registered ``amad-captioner`` version's artifacts (``amad export`` of a captioner:
:mod:`pipeline.captioner_pyfunc`): ``encoder.onnx``, ``decoder.onnx``, ``tokenizer.json``, ``config.json``
(the special tokens) and ``captions.json`` (image size, longest caption). The pickled pyfunc class is
never loaded: a replica runs only this repository's code.

One batch of requests is one encoder call over all its images; then the greedy requests decode
together in a loop that retires each row once it has written its end token or reached its own
``max_length`` -- one token per step over cached keys and values where the version has the cached decoder
(:meth:`pipeline.captioner_cache.CachedCaptioner.greedy_retiring`; versions registered before it: the whole
prefix per step, :meth:`pipeline.captioner_onnx.OnnxCaptioner.greedy_retiring`) -- and beam-search requests
decode in groups of the same ``(num_beams, max_length)`` on the already encoded images (over the cache too). Every caption is
what ``generate`` writes for that image alone with the same settings (the export's parity gate and
``tests/test_serve_caption.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from serving.config import Limits
from serving.inputs import BadInput
from serving.model import CAPTIONER, ROUTES, Bundle, default_providers, session_options


@dataclass(frozen=True)
class PreparedCaption:
    """One validated request: ``image`` ``(S, S, 3)`` uint8 at the model's size, and its decoding settings."""

    image: np.ndarray
    max_length: int
    num_beams: int


@dataclass(frozen=True)
class Caption:
    caption: str
    tokens: list[int]  # ids from the start token up to and including the end token


class CaptionPredictor:
    """Encoder and decoder sessions with the captioner's pre- and post-processing."""

    kind = CAPTIONER

    def __init__(self, bundle: Bundle, providers: list[str] | None = None, threads: int | None = None, limits: Limits | None = None):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        from pipeline.captioner_cache import CROSS_FILE, STEP_FILE, CachedCaptioner
        from pipeline.captioner_onnx import DECODER_FILE, OnnxCaptioner, TokenIds

        self.bundle = bundle
        self.limits = limits or Limits()
        config, captions = bundle.config(), bundle.benchmark()
        try:
            self.tokens = TokenIds(int(config["decoder_start_token_id"]), int(config["eos_token_id"]), int(config["pad_token_id"]))
            self.image_size = int(captions["scene"]["grid"]) * int(captions["scene"]["cell"])
            self.max_length = int(captions["max_caption_length"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{bundle.name} v{bundle.version}: config.json or captions.json lacks {err} (re-run amad export)") from None
        self.tokenizer = Tokenizer.from_file(str(bundle.directory / "tokenizer.json"))
        options, providers = session_options(threads), providers or default_providers()
        encoder = ort.InferenceSession(str(bundle.onnx_path), sess_options=options, providers=providers)
        self.session = ort.InferenceSession(str(bundle.onnx_path.with_name(DECODER_FILE)), sess_options=options, providers=providers)
        self.captioner = OnnxCaptioner(encoder, self.session, self.tokens)
        self.cached = None  # the decoder with past key/values (pipeline.captioner_cache), where the version has it
        cross_file, step_file = bundle.directory / CROSS_FILE, bundle.directory / STEP_FILE
        if cross_file.is_file() and step_file.is_file():
            from pipeline.captioner_pyfunc import cache_heads

            step = ort.InferenceSession(str(step_file), sess_options=options, providers=providers)
            cross = ort.InferenceSession(str(cross_file), sess_options=options, providers=providers)
            self.cached = CachedCaptioner(encoder, cross, step, self.tokens, cache_heads(step))

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def prepare(self, image: bytes | np.ndarray, max_length: int | None = None, num_beams: int = 1) -> PreparedCaption:
        """Decode and check one request; BadInput (4xx) naming the problem."""
        from amad.data.images import decode_image

        max_length = self.max_length if max_length is None else max_length
        if not 2 <= max_length <= self.max_length:
            raise BadInput(422, f"max_length={max_length} is out of range (2..{self.max_length}, this model's longest caption)")
        if not 1 <= num_beams <= self.limits.max_num_beams:
            raise BadInput(422, f"num_beams={num_beams} is out of range (1..{self.limits.max_num_beams})")
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.shape != (self.image_size, self.image_size, 3):
                raise BadInput(422, f"an image array must be ({self.image_size}, {self.image_size}, 3) uint8, got {image.shape} {image.dtype}")
            return PreparedCaption(image, max_length, num_beams)
        try:
            pixels = decode_image(image, self.image_size, max_pixels=self.limits.max_image_pixels)
        except Image.DecompressionBombError as err:  # PIL's own limit, hit before ours for huge headers
            raise BadInput(413, f"image is too large: {err}") from None
        except ValueError as err:
            raise BadInput(413 if "over the limit" in str(err) else 400, str(err)) from None
        return PreparedCaption(pixels, max_length, num_beams)

    def caption(self, items: list[PreparedCaption]) -> list[Caption]:
        """Captions of ``items`` in order: one encoder call, then the decoding loops (see the module docstring)."""
        from amad.data.captions import decode_caption
        from pipeline.captioner_onnx import caption_ids
        from pipeline.captioner_pyfunc import pixels_from_uint8

        if not items:
            return []
        encoded = self.captioner.encode(pixels_from_uint8(np.stack([item.image for item in items])))  # (B, P+1, D)
        ids: list[list[int] | None] = [None] * len(items)
        greedy = [index for index, item in enumerate(items) if item.num_beams == 1]
        if greedy:
            decoder = self.cached or self.captioner
            for index, row in zip(greedy, decoder.greedy_retiring(encoded[greedy], [items[i].max_length for i in greedy])):
                ids[index] = row
        groups: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(items):
            if item.num_beams > 1:
                groups.setdefault((item.num_beams, item.max_length), []).append(index)
        for (num_beams, max_length), members in groups.items():
            for index, row in zip(members, (self.cached or self.captioner).beam_encoded(encoded[members], max_length, num_beams).tolist()):
                ids[index] = caption_ids(row, self.tokens)
        return [Caption(decode_caption(self.tokenizer, row), [int(token) for token in row]) for row in ids]

    def predict(self, images: list[bytes | np.ndarray], max_length: int | None = None, num_beams: int = 1) -> list[Caption]:
        """Captions of ``images`` (encoded bytes, or ``(S, S, 3)`` uint8 arrays), one batch."""
        return self.caption([self.prepare(image, max_length, num_beams) for image in images])

    def describe(self) -> dict:
        config, tags = self.bundle.config(), self.bundle.tags

        def heads(part: str, key: str) -> int:
            """The most heads a layer of ``part`` has: a pruned captioner records what each layer kept."""
            pruned = (config.get("amad_pruning") or {}).get(part, {}).get(key) or []
            return max((len(kept) for kept in pruned), default=int(config.get(part, {}).get("num_attention_heads", 0)))

        return {
            "name": self.bundle.name,
            "version": self.bundle.version,
            "alias": self.bundle.alias,
            "kind": self.kind,
            "route": ROUTES[self.kind],
            "encoder": {"layers": int(config.get("encoder", {}).get("num_hidden_layers", 0)), "heads": heads("encoder", "heads")},
            "decoder": {"layers": int(config.get("decoder", {}).get("num_hidden_layers", 0)), "heads": heads("decoder", "self_heads")},
            "image_size": self.image_size,
            "max_length": self.max_length,
            "max_num_beams": self.limits.max_num_beams,
            "decoding": "cached (past key/values)" if self.cached is not None else "whole prefix per token",
            "parity": {k.split(".", 1)[1]: float(v) for k, v in tags.items() if k.startswith("parity.")},
            "val_cider_d": float(tags["val_cider_d"]) if "val_cider_d" in tags else None,
            "providers": self.providers,
            "captions": self.bundle.benchmark(),
        }
