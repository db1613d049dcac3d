"""Drawn images out: pixels a model drew -> PNG bytes, base64 and the content part that
carries them in a chat answer. At the model's own size (a 64x64 drawing is 64x64 pixels):
a viewer scales it up, the bytes do not."""

from __future__ import annotations

import base64
import io

import torch
from PIL import Image


def to_image(pixels: torch.Tensor) -> Image.Image:
    """pixels [3, S, S] in [0, 1] -> an RGB image of S x S (rounded to 8 bits)."""
    eight = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(eight.permute(1, 2, 0).contiguous().cpu().numpy())  # [S, S, 3]: RGB


def png_bytes(pixels: torch.Tensor) -> bytes:
    """pixels [3, S, S] in [0, 1] -> the bytes of a PNG file."""
    buffer = io.BytesIO()
    to_image(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png_base64(pixels: torch.Tensor) -> str:
    """pixels [3, S, S] in [0, 1] -> base64 of a PNG (OpenAI's `b64_json`)."""
    return base64.b64encode(png_bytes(pixels)).decode("ascii")


def image_part(pixels: torch.Tensor) -> dict:
    """A drawn image as a chat answer's image: {"type": "image_url", "image_url": {"url":
    "data:image/png;base64,..."}}, the shape of an image part in a request's messages (and of
    `message.images` as OpenRouter returns drawn images)."""
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_base64(pixels)}}
