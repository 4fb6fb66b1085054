"""The registered captioner as an MLflow pyfunc model: ``mlflow.pyfunc.load_model(uri).predict(images)`` -> captions.

The model directory holds the ONNX graphs (:mod:`pipeline.captioner_onnx`'s encoder and decoder, and the decoder
with past key/values of :mod:`pipeline.captioner_cache`, which greedy and beam captioning run on), the tokenizer, the
captioner's ``config.json`` (special tokens) and ``captions.json`` (image size, longest caption). Input:
a DataFrame with an ``image`` column of encoded images (PNG/JPEG bytes; MLflow's scoring server takes them
base64-encoded in JSON); :meth:`CaptionerModel.predict` itself also takes base64 text or a ``(N, S, S, 3)``
uint8 array. Output: a DataFrame with ``caption`` (text) and ``tokens`` (ids). Params
(optional): ``max_length`` (default the captions' longest) and ``num_beams`` (default 1: greedy).
"""

from __future__ import annotations

import base64
import binascii
import json

import mlflow.pyfunc
import numpy as np

ARTIFACTS = ("encoder", "decoder", "cross_kv", "decoder_step", "tokenizer", "config", "captions")  # cross_kv, decoder_step: versions since the cache
PARAM_DEFAULTS = {"max_length": 0, "num_beams": 1}  # max_length 0: the captions' longest (the signature needs a typed default)


def signature():
    """Input: a DataFrame with a binary ``image`` column (MLflow's scoring server takes base64 text for it);
    output: ``caption``; params ``max_length`` and ``num_beams``."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("binary", "image")]), outputs=Schema([ColSpec("string", "caption")]),
                          params=ParamSchema([ParamSpec(name, "long", default) for name, default in PARAM_DEFAULTS.items()]))


def pixels_from_uint8(images: np.ndarray) -> np.ndarray:
    """``(B, S, S, 3)`` uint8 -> ``(B, 3, S, S)`` float32 in ``[-1, 1]`` (as :func:`amad.data.images.pixels_from_uint8`)."""
    return (np.transpose(images, (0, 3, 1, 2)).astype(np.float32) / np.float32(127.5)) - np.float32(1.0)


def cache_heads(step_session) -> list[tuple[int, int]]:
    """Per decoder layer ``(self-attention heads, head size)``, read from the step graph's ``past_k_<l>`` inputs."""
    shapes = {item.name: item.shape for item in step_session.get_inputs()}
    layers = sum(name.startswith("past_k_") for name in shapes)
    return [(int(shapes[f"past_k_{i}"][1]), int(shapes[f"past_k_{i}"][3])) for i in range(layers)]


def _image_bytes(value) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("an image given as text must be base64-encoded image bytes") from None
    raise ValueError(f"an image must be encoded bytes or base64 text, got {type(value).__name__}")


class CaptionerModel(mlflow.pyfunc.PythonModel):
    """Captions images with the exported encoder and decoder over ONNX Runtime (CPU)."""

    def load_context(self, context) -> None:
        import onnxruntime

        from pipeline.captioner_onnx import OnnxCaptioner, TokenIds

        artifacts = context.artifacts
        options = onnxruntime.SessionOptions()
        sessions = [onnxruntime.InferenceSession(artifacts[name], options, providers=["CPUExecutionProvider"]) for name in ("encoder", "decoder")]
        config = json.loads(open(artifacts["config"]).read())
        captions = json.loads(open(artifacts["captions"]).read())
        self.tokens = TokenIds(int(config["decoder_start_token_id"]), int(config["eos_token_id"]), int(config["pad_token_id"]))
        self.captioner = OnnxCaptioner(*sessions, self.tokens)
        self.cached = None  # a version registered before the cached decoder existed decodes over the whole prefix
        if "cross_kv" in artifacts and "decoder_step" in artifacts:
            from pipeline.captioner_cache import CachedCaptioner

            cross, step = (onnxruntime.InferenceSession(artifacts[name], options, providers=["CPUExecutionProvider"]) for name in ("cross_kv", "decoder_step"))
            self.cached = CachedCaptioner(sessions[0], cross, step, self.tokens, cache_heads(step))
        self.image_size = int(captions["scene"]["grid"]) * int(captions["scene"]["cell"])
        self.max_length = int(captions["max_caption_length"])
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(artifacts["tokenizer"])

    def images(self, model_input) -> np.ndarray:
        """The batch ``(N, S, S, 3)`` uint8 from a DataFrame of encoded images or an array; ValueError naming the problem."""
        from amad.data.images import decode_image

        if isinstance(model_input, np.ndarray):
            if model_input.dtype != np.uint8 or model_input.shape[1:] != (self.image_size, self.image_size, 3):
                raise ValueError(f"an image array must be (N, {self.image_size}, {self.image_size}, 3) uint8, "
                                 f"got {model_input.shape} {model_input.dtype}")
            return model_input
        if not hasattr(model_input, "columns") or "image" not in model_input.columns:
            raise ValueError("input must be a DataFrame with an 'image' column (encoded image bytes or base64) or a uint8 image array")
        decoded = []
        for row, value in enumerate(model_input["image"]):
            try:
                decoded.append(decode_image(_image_bytes(value), self.image_size))
            except ValueError as err:
                raise ValueError(f"image {row}: {err}") from None
        return np.stack(decoded) if decoded else np.zeros((0, self.image_size, self.image_size, 3), np.uint8)

    def predict(self, context, model_input, params: dict | None = None):
        import pandas as pd

        from amad.data.captions import decode_caption
        from pipeline.captioner_onnx import caption_ids

        settings = {**PARAM_DEFAULTS, **(params or {})}
        max_length = int(settings["max_length"]) or self.max_length
        num_beams = int(settings["num_beams"])
        if not 2 <= max_length <= self.max_length:
            raise ValueError(f"max_length={max_length} must be in 2..{self.max_length} (the captions' longest)")
        if not 1 <= num_beams <= 8:
            raise ValueError(f"num_beams={num_beams} must be in 1..8")
        images = self.images(model_input)
        if not len(images):
            return pd.DataFrame({"caption": [], "tokens": []})
        pixels = pixels_from_uint8(images)
        if self.cached is not None:
            encoded = self.captioner.encode(pixels)
            rows = (self.cached.greedy_retiring(encoded, [max_length] * len(pixels)) if num_beams == 1
                    else self.cached.beam_encoded(encoded, max_length, num_beams).tolist())
        else:
            rows = (self.captioner.greedy(pixels, max_length) if num_beams == 1 else self.captioner.beam(pixels, max_length, num_beams)).tolist()
        return pd.DataFrame({"caption": [decode_caption(self.tokenizer, row) for row in rows],
                             "tokens": [caption_ids(row, self.tokens) for row in rows]})
