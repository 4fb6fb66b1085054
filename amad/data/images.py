"""Image pre-processing shared by training, export checks and serving.

Pixels of this project's own models reach them as ``(B, 3, S, S)`` float32 in ``[-1, 1]``
(``x / 127.5 - 1``), images resized to the model's square input size first (a Hugging Face
checkpoint's own image processor does its part: :mod:`amad.data.preprocess`). Greyscale, RGBA and palette images are converted to RGB.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


def rgb_image(image: Image.Image) -> Image.Image:
    """Any PIL image as RGB; transparent pixels are composited on black; ValueError for an empty image."""
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image is empty ({image.width}x{image.height} pixels)")
    if image.mode != "RGB":
        # Composite transparent pixels on black rather than keeping arbitrary colour values.
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
            image = Image.alpha_composite(background, rgba)
        image = image.convert("RGB")
    return image


def rgb(image: Image.Image) -> np.ndarray:
    """A PIL image -> ``(H, W, 3)`` uint8 at its own size."""
    return np.asarray(rgb_image(image), dtype=np.uint8)


def to_rgb_array(image: Image.Image, size: int) -> np.ndarray:
    """A PIL image -> ``(size, size, 3)`` uint8, resized with bilinear filtering when needed."""
    image = rgb_image(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def open_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Encoded PNG/JPEG/... bytes -> a decoded PIL image.

    Raises ValueError naming the problem for bytes that are not an image, truncated files, and
    images over ``max_pixels`` (checked from the header, before decoding the pixels).
    """
    if not data:
        raise ValueError("image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as err:
        raise ValueError("image bytes are not a recognised image format (PNG, JPEG, ...)") from err
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ValueError(f"image is {image.width}x{image.height} pixels, over the limit of {max_pixels}")
    try:
        image.load()
    except (OSError, SyntaxError) as err:
        raise ValueError(f"image could not be decoded (truncated or corrupt): {err}") from err
    return image


def decode_image(data: bytes, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Encoded image bytes -> ``(size, size, 3)`` uint8 (errors as :func:`open_image`)."""
    return to_rgb_array(open_image(data, max_pixels), size)


def pixels_from_uint8(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 -> ``(B, 3, H, W)`` float32 in ``[-1, 1]``."""
    tensor = torch.as_tensor(images)
    if tensor.dtype != torch.uint8 or tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3) uint8, got {tuple(tensor.shape)} {tensor.dtype}")
    return tensor.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
