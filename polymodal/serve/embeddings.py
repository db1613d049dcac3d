"""Embeddings from a dual-encoder model: texts, and images sent as data: URIs."""

from __future__ import annotations

from polymodal.serve.errors import APIError
from polymodal.serve.media import MediaLimits, decode_image
from polymodal.serve.schemas import EmbeddingRequest


def embed(model, model_name: str, body: EmbeddingRequest, limits: MediaLimits) -> dict:
    if not hasattr(model, "encode_texts"):
        raise APIError(400, "this model has no embeddings (it is not a dual encoder)", param="model")
    import torch

    inputs = [body.input] if isinstance(body.input, str) else body.input
    if any(not text.strip() for text in inputs):
        raise APIError(400, "an input is empty", param="input")
    vectors, tokens = [], 0
    with torch.inference_mode():
        for index, text in enumerate(inputs):
            if text.startswith("data:"):
                image = decode_image(text, limits, f"input.{index}")
                vector = model.encode_images(model.encoder.load_media(image)[None])[0]
            else:
                vector = model.encode_texts([text])[0]
                tokens += len(model.text.tokenizer(text)["input_ids"])
            vectors.append({"object": "embedding", "index": index, "embedding": vector.tolist()})
    return {"object": "list", "data": vectors, "model": model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
