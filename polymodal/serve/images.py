"""Image generation in OpenAI's format (`POST /v1/images/generations`) from a model that
draws (issue 17): each of the `n` images is a drawing request of the batching engine
(`BatchingEngine.submit_images`), run in the same decode steps as the chat requests, with
the same queue limit (429 when full), errors and disconnect handling as chat.

    {"prompt": "Draw a red circle.", "n": 2, "size": "64x64", "response_format": "b64_json",
     "guidance_scale": 3.0, "seed": 0}
    -> {"created": 1700000000, "data": [{"b64_json": PNG}, {"b64_json": PNG}], ...}

The prompt is the user's message of a one-turn chat, as `polymodal generate` sends it; the
images are the model's own pixels (64x64 for the easy-VQA recipe), never scaled. Only
`b64_json` comes back: the server keeps no files for a `url` to point at.
"""

from __future__ import annotations

import time

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from polymodal.engine.batching import BatchingEngine, QueueFull
from polymodal.engine.sampling import SamplingParams
from polymodal.errors import ContextLengthError, UserError
from polymodal.serve.chat import _ENCODING, next_event  # the tokenizer's one-at-a-time lock
from polymodal.serve.errors import APIError, api_error
from polymodal.serve.pictures import png_base64
from polymodal.serve.schemas import ImageGenerationRequest


def drawing_prompt(text: str) -> dict:
    """The prompt that asks for a drawing: one user turn holding `text` as a text part (so
    that `<image>` typed in it is text, not a placeholder)."""
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}


def image_size(model) -> str:
    """The size the model draws, as OpenAI writes sizes: "64x64"."""
    side = model.config.image_output.tokenizer.image_size
    return f"{side}x{side}"


def check(engine: BatchingEngine | None, model, body: ImageGenerationRequest) -> None:
    """Refuse what this server cannot draw before any work: APIError 400 naming the field."""
    unsupported = body.unsupported()
    if unsupported:
        raise APIError(400, unsupported[1], param=unsupported[0])
    if engine is None:
        raise APIError(400, "this model does not draw images (a dual encoder); use /v1/embeddings",
                       param="model")
    try:
        engine.drawing_codes()
    except UserError as error:
        raise APIError(400, str(error), param="model") from None
    own = image_size(model)
    if body.size not in (None, "auto", own):
        raise APIError(400, f"size {body.size!r}: this model draws {own} images only; send size "
                            f'"{own}" or leave it out', param="size")
    if body.guidance_scale != 1.0 and engine.max_batch < 2:
        raise APIError(400, "classifier-free guidance runs two rows per image; this server batches 1 "
                            "(--max-batch): send guidance_scale 1", param="guidance_scale")
    if body.n > engine.max_queue:
        raise APIError(400, f"n is {body.n}; this server queues at most {engine.max_queue}", param="n")


async def generate(engine: BatchingEngine, model, body: ImageGenerationRequest, http: Request) -> dict:
    """The response body; APIError for the client's mistakes (400), a full queue (429) or a
    failed generation (500). A client that goes away cancels its drawings."""
    check(engine, model, body)
    params = SamplingParams(temperature=body.temperature, top_k=body.top_k, seed=body.seed,
                            guidance_scale=body.guidance_scale)
    requests = await run_in_threadpool(_submit, engine, body, params)
    images = []
    try:
        for request in requests:
            while True:
                kind, value = await next_event(request, http)
                if kind == "error":
                    raise APIError(500, "generation failed", kind="server_error")
                if kind == "done":
                    break
            if value.finish_reason != "stop" or len(value.images) != 1:
                raise APIError(500, "generation failed", kind="server_error")
            images.append(value.images[0])
    finally:
        for request in requests:
            request.cancel()  # no-op for finished ones; frees the others if we stopped early
    return {"created": int(time.time()), "data": [{"b64_json": png_base64(image)} for image in images],
            "size": image_size(model), "output_format": "png"}


def _submit(engine: BatchingEngine, body: ImageGenerationRequest, params: SamplingParams) -> list:
    with _ENCODING:
        try:
            return engine.submit_images(drawing_prompt(body.prompt), params, body.n)
        except (QueueFull, ContextLengthError, UserError) as error:
            raise api_error(error, "prompt") from None
