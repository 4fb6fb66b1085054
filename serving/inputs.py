"""Request parsing and validation: bytes in, a :class:`Query` out, or :class:`BadInput` (a 4xx).

Nothing here needs Ray or the model; the model-dependent checks (decoding the image at the model's
size, counting the question's words against its text length) live in :mod:`serving.model`.

Status codes: 400 malformed body (JSON syntax, base64, not an image), 401 missing/wrong token,
413 too large (body, image bytes, image pixels), 415 wrong content type, 422 well-formed but
invalid (missing/extra fields, wrong types, empty or over-long question, ``top_k`` out of range).

Two request kinds: a question about an image (``/v1/answer``: :func:`parse_json`, :func:`parse_multipart`)
and an image to caption (``/v1/caption``: :func:`parse_caption_json`, :func:`parse_caption_multipart`,
with optional ``max_length`` and ``num_beams``; the model's own longest caption is checked in
:mod:`serving.captioning`).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from serving.config import Limits

JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"
FIELDS = ("image", "question", "top_k")
CAPTION_FIELDS = ("image", "max_length", "num_beams")


class BadInput(Exception):
    """A client error: ``status`` (4xx) and a message that names the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> dict:
        return {"error": self.message, "status": self.status}


@dataclass(frozen=True)
class Query:
    image: bytes  # encoded PNG/JPEG/... bytes
    question: str
    top_k: int


@dataclass(frozen=True)
class CaptionQuery:
    image: bytes  # encoded PNG/JPEG/... bytes
    max_length: int | None  # None: the model's longest caption
    num_beams: int


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def check_content_length(header: str | None, limits: Limits) -> None:
    """413 before reading a body whose declared length is over the limit."""
    if header is None:
        return
    try:
        length = int(header)
    except ValueError:
        raise BadInput(400, f"Content-Length {header!r} is not a number") from None
    if length > limits.max_body_bytes:
        raise BadInput(413, f"request body is {length} bytes, over the limit of {limits.max_body_bytes}")


def check_question(question: object, limits: Limits) -> str:
    if not isinstance(question, str):
        raise BadInput(422, f"question must be a string, got {type(question).__name__}")
    if not question.strip():
        raise BadInput(422, "question is empty")
    if len(question) > limits.max_question_chars:
        raise BadInput(422, f"question is {len(question)} characters, over the limit of {limits.max_question_chars}")
    return question


def check_top_k(top_k: object, limits: Limits) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise BadInput(422, f"top_k must be a whole number, got {top_k!r}")
    if not 1 <= top_k <= limits.max_top_k:
        raise BadInput(422, f"top_k={top_k} is out of range (1..{limits.max_top_k})")
    return top_k


def check_image_bytes(data: bytes, limits: Limits) -> bytes:
    if not data:
        raise BadInput(400, "image is empty (0 bytes)")
    if len(data) > limits.max_image_bytes:
        raise BadInput(413, f"image is {len(data)} bytes, over the limit of {limits.max_image_bytes}")
    return data


def json_object(body: bytes, fields: tuple[str, ...], required: int) -> dict:
    """The body as a JSON object whose keys are among ``fields``, with the first ``required`` of them present."""
    try:
        values = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadInput(400, f"body is not valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise BadInput(422, f"body must be a JSON object with fields {list(fields[:required])}, got {type(values).__name__}")
    extra = sorted(set(values) - set(fields))
    if extra:
        raise BadInput(422, f"unknown field(s) {extra}; allowed: {list(fields)}")
    missing = [name for name in fields[:required] if name not in values]
    if missing:
        raise BadInput(422, f"missing field(s) {missing}")
    return values


def parse_json(body: bytes, limits: Limits) -> Query:
    """``{"image": <base64>, "question": str, "top_k": int?}`` -> Query."""
    values = json_object(body, FIELDS, 2)
    data = base64_image(values["image"], limits)
    question = check_question(values["question"], limits)
    top_k = check_top_k(values.get("top_k", 1), limits)
    return Query(data, question, top_k)


def base64_image(image: object, limits: Limits) -> bytes:
    """A JSON body's ``image`` (base64 text) -> the image's bytes, checked against the byte limit."""
    if not isinstance(image, str):
        raise BadInput(422, f"image must be a base64 string, got {type(image).__name__}")
    if len(image) > limits.max_image_bytes * 4 // 3 + 4:
        raise BadInput(413, f"image is about {len(image) * 3 // 4} bytes, over the limit of {limits.max_image_bytes}")
    try:
        data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadInput(400, f"image is not valid base64: {err}") from None
    return check_image_bytes(data, limits)


async def parse_multipart(form, limits: Limits) -> Query:
    """A parsed multipart form (Starlette ``FormData``: an ``image`` file, a ``question`` field,
    optionally ``top_k``) -> Query."""
    extra = sorted(set(form.keys()) - set(FIELDS))
    if extra:
        raise BadInput(422, f"unknown form field(s) {extra}; allowed: {list(FIELDS)}")
    missing = [name for name in FIELDS[:2] if name not in form]
    if missing:
        raise BadInput(422, f"missing form field(s) {missing}")
    upload = form["image"]
    if isinstance(upload, str):
        raise BadInput(422, "image must be a file part (multipart upload), not a text field")
    data = await upload.read()
    question = check_question(form["question"], limits)
    top_k_text = form.get("top_k", "1")
    if isinstance(top_k_text, str) and top_k_text.strip().lstrip("-").isdigit():
        top_k = check_top_k(int(top_k_text), limits)
    else:
        raise BadInput(422, f"top_k must be a whole number, got {top_k_text!r}")
    return Query(check_image_bytes(data, limits), question, top_k)


def check_num_beams(num_beams: object, limits: Limits) -> int:
    if isinstance(num_beams, bool) or not isinstance(num_beams, int):
        raise BadInput(422, f"num_beams must be a whole number, got {num_beams!r}")
    if not 1 <= num_beams <= limits.max_num_beams:
        raise BadInput(422, f"num_beams={num_beams} is out of range (1..{limits.max_num_beams})")
    return num_beams


def check_max_length(max_length: object) -> int | None:
    """A whole number or null (the model's range is checked where the model is known)."""
    if max_length is None:
        return None
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise BadInput(422, f"max_length must be a whole number, got {max_length!r}")
    return max_length


def parse_caption_json(body: bytes, limits: Limits) -> CaptionQuery:
    """``{"image": <base64>, "max_length": int?, "num_beams": int?}`` -> CaptionQuery."""
    values = json_object(body, CAPTION_FIELDS, 1)
    data = base64_image(values["image"], limits)
    return CaptionQuery(data, check_max_length(values.get("max_length")), check_num_beams(values.get("num_beams", 1), limits))


def _form_number(form, name: str, default: str | None) -> int | None:
    text = form.get(name, default)
    if text is None:
        return None
    if isinstance(text, str) and text.strip().lstrip("-").isdigit():
        return int(text)
    raise BadInput(422, f"{name} must be a whole number, got {text!r}")


async def parse_caption_multipart(form, limits: Limits) -> CaptionQuery:
    """A parsed multipart form (an ``image`` file, optionally ``max_length`` and ``num_beams`` fields) -> CaptionQuery."""
    extra = sorted(set(form.keys()) - set(CAPTION_FIELDS))
    if extra:
        raise BadInput(422, f"unknown form field(s) {extra}; allowed: {list(CAPTION_FIELDS)}")
    if "image" not in form:
        raise BadInput(422, "missing form field(s) ['image']")
    upload = form["image"]
    if isinstance(upload, str):
        raise BadInput(422, "image must be a file part (multipart upload), not a text field")
    data = check_image_bytes(await upload.read(), limits)
    return CaptionQuery(data, _form_number(form, "max_length", None), check_num_beams(_form_number(form, "num_beams", "1"), limits))
