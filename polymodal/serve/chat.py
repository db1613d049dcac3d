"""Chat completions: OpenAI messages to an engine prompt, and the engine's events back as
one response or as server-sent chunks. A client that goes away cancels its requests."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request

from polymodal.engine.batching import BatchingEngine, QueueFull
from polymodal.engine.sampling import SamplingParams
from polymodal.errors import UserError
from polymodal.serve.errors import APIError
from polymodal.serve.media import MediaLimits, decode_image
from polymodal.serve.schemas import ChatRequest

DEFAULT_MAX_TOKENS = 256


def submit(engine: BatchingEngine, prompt: dict, body: ChatRequest, index: int):
    params = SamplingParams(
        max_new_tokens=body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=body.temperature, top_p=body.top_p,
        seed=None if body.seed is None else body.seed + index,
        stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []))
    try:
        return engine.submit(prompt, params)
    except QueueFull:
        raise APIError(429, "the server is busy; retry shortly", kind="rate_limit_error",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    except UserError as error:
        param = "max_tokens" if "exceeds the context" in str(error) else "messages"
        raise APIError(400, str(error), param=param, code="context_length_exceeded"
                       if param == "max_tokens" else None) from None


def to_prompt(body: ChatRequest, model, limits: MediaLimits) -> dict:
    """OpenAI messages -> {"messages": [...], "images": [PIL]} with placeholders in the text."""
    placeholder = model.image_placeholder
    messages, images = [], []
    for m, message in enumerate(body.messages):
        content = message.content or ""
        if isinstance(content, list):
            pieces = []
            for p, part in enumerate(content):
                param = f"messages.{m}.content.{p}"
                if part.type == "text":
                    pieces.append(part.text or "")
                elif part.image_url is None:
                    raise APIError(400, "an image_url part needs image_url.url", param=param)
                else:
                    if len(images) >= limits.max_images:
                        raise APIError(400, f"too many images: at most {limits.max_images} per request",
                                       param=param, code="too_many_images")
                    images.append(decode_image(part.image_url.url, limits, f"{param}.image_url.url"))
                    pieces.append(placeholder)
            content = "".join(pieces)
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": content})
    if images and model.encoder is None:
        raise APIError(400, "this model takes text only; remove the images", param="messages")
    return {"messages": messages, "images": images}


async def next_event(request, http: Request | None):
    """The request's next event, without blocking the event loop; cancels the request
    when the client has gone."""
    checks = 0
    while True:
        try:
            return request.queue.get_nowait()
        except Exception:
            checks += 1
            if http is not None and checks % 20 == 0 and await http.is_disconnected():
                request.cancel()
                raise asyncio.CancelledError from None
            await asyncio.sleep(0.005)


async def complete(body: ChatRequest, model_name: str, requests, http: Request) -> dict:
    choices, prompt_tokens, completion_tokens = [], 0, 0
    try:
        for index, request in enumerate(requests):
            while True:
                kind, value = await next_event(request, http)
                if kind == "error":
                    raise APIError(500, "generation failed", kind="server_error")
                if kind == "done":
                    break
            choices.append({"index": index, "message": {"role": "assistant", "content": value.text},
                            "finish_reason": value.finish_reason, "logprobs": None})
            prompt_tokens = value.prompt_tokens
            completion_tokens += value.completion_tokens
    finally:
        for request in requests:
            request.cancel()  # no-op for finished ones; frees the others if we stopped early
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


async def stream_chunks(body: ChatRequest, model_name: str, requests, http: Request):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(index: int, delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        data = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": [] if index < 0 else [{"index": index, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    try:
        for index, request in enumerate(requests):
            yield chunk(index, {"role": "assistant", "content": ""})
            while True:
                kind, value = await next_event(request, http)
                if kind == "text":
                    yield chunk(index, {"content": value})
                elif kind == "error":
                    yield f"data: {json.dumps(APIError(500, 'generation failed', 'server_error').body())}\n\n"
                    break
                else:
                    usage["prompt_tokens"] = value.prompt_tokens
                    usage["completion_tokens"] += value.completion_tokens
                    yield chunk(index, {}, value.finish_reason)
                    break
        if (body.stream_options or {}).get("include_usage"):
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            yield chunk(-1, {}, usage=usage)
        yield "data: [DONE]\n\n"
    finally:
        for request in requests:
            request.cancel()
