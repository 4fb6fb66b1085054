"""Request parsing and validation: bytes in, a :class:`Query` out, or :class:`BadInput` (a 4xx).

Nothing here needs Ray or the model; the model-dependent checks (decoding the image at the model's
size, counting the question's words against its text length) live in :mod:`serving.model`.

Status codes: 400 malformed body (JSON syntax, base64, not an image), 401 missing/wrong token,
413 too large (body, image bytes, image pixels), 415 wrong content type, 422 well-formed but
invalid (missing/extra fields, wrong types, empty or over-long question, ``top_k`` out of range).
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


def parse_json(body: bytes, limits: Limits) -> Query:
    """``{"image": <base64>, "question": str, "top_k": int?}`` -> Query."""
    try:
        values = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadInput(400, f"body is not valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise BadInput(422, f"body must be a JSON object with fields {list(FIELDS[:2])}, got {type(values).__name__}")
    extra = sorted(set(values) - set(FIELDS))
    if extra:
        raise BadInput(422, f"unknown field(s) {extra}; allowed: {list(FIELDS)}")
    missing = [name for name in FIELDS[:2] if name not in values]
    if missing:
        raise BadInput(422, f"missing field(s) {missing}")
    image = values["image"]
    if not isinstance(image, str):
        raise BadInput(422, f"image must be a base64 string, got {type(image).__name__}")
    if len(image) > limits.max_image_bytes * 4 // 3 + 4:
        raise BadInput(413, f"image is about {len(image) * 3 // 4} bytes, over the limit of {limits.max_image_bytes}")
    try:
        data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadInput(400, f"image is not valid base64: {err}") from None
    question = check_question(values["question"], limits)
    top_k = check_top_k(values.get("top_k", 1), limits)
    return Query(check_image_bytes(data, limits), question, top_k)


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
