"""Embeddings from a dual-encoder model, following OpenAI's embeddings API
(https://platform.openai.com/docs/api-reference/embeddings).

`input` is a string or a list whose items are strings (always text, whatever they begin
with) or image parts written as in chat messages:
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}
(`{"type": "text", "text": ...}` is text too). `encoding_format` "float" gives lists of
numbers; "base64" gives each vector as base64 of its little-endian float32 bytes (what the
official clients ask for by default). `dimensions` is refused unless it is the model's own
size: these vectors are not trained to be truncated."""

from __future__ import annotations

import base64

from polymodal.serve.errors import APIError
from polymodal.serve.media import MediaLimits, decode_image
from polymodal.serve.schemas import EmbeddingRequest


def embed(model, model_name: str, body: EmbeddingRequest, limits: MediaLimits) -> dict:
    """The response body; slow (runs the model): callers on an event loop run it in a thread.
    Raises APIError (400) naming the input at fault."""
    if not hasattr(model, "encode_texts"):
        raise APIError(400, "this model has no embeddings (it is not a dual encoder)", param="model")
    import torch

    images = sum(part.type == "image_url" for part in body.input)
    if images > limits.max_images:
        raise APIError(400, f"too many images: at most {limits.max_images} per request", param="input",
                       code="too_many_images")
    vectors, tokens = [], 0
    with torch.inference_mode():
        for index, part in enumerate(body.input):
            if part.type in ("input_audio", "input_series"):
                raise APIError(400, f"embeddings take text and images; {part.type} is for chat",
                               param=f"input[{index}]")
            if part.type == "image_url":
                if part.image_url is None:
                    raise APIError(400, 'an image_url input needs "image_url": {"url": ...}',
                                   param=f"input[{index}].image_url")
                image = decode_image(part.image_url.url, limits, f"input[{index}].image_url.url")
                vector = model.encode_images(model.encoder.load_media(image)[None])[0]
            else:
                text = part.text or ""
                if not text.strip():
                    raise APIError(400, "an input is empty", param=f"input[{index}]")
                vector = model.encode_texts([text])[0]
                tokens += len(model.text.tokenizer(text)["input_ids"])
            if body.dimensions is not None and body.dimensions != vector.shape[-1]:
                raise APIError(400, f"this model's embeddings have {vector.shape[-1]} dimensions; "
                                    "dimensions cannot change that", param="dimensions")
            vectors.append({"object": "embedding", "index": index,
                            "embedding": _encoded(vector, body.encoding_format)})
    return {"object": "list", "data": vectors, "model": model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _encoded(vector, encoding_format: str):
    if encoding_format == "base64":
        data = vector.float().cpu().numpy().astype("<f4").tobytes()
        return base64.b64encode(data).decode("ascii")
    return vector.float().tolist()

