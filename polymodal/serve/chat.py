"""Chat completions: OpenAI messages to an engine prompt, and the engine's events back as
one response or as server-sent chunks. A client that goes away cancels its requests.

An answer that draws (a model with image_output) carries its images in the extension field
`images` of the message (of the chunk's `delta` when streamed, sent as each image is
complete): [{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}], the
shape of an image part in a request and of OpenRouter's drawn images. Not in `content`: a
client sends `content` back in the next turn, where kilobytes of base64 would be read as
text; an unknown field is ignored by OpenAI's clients (kept in `model_extra`)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from polymodal.engine.batching import BatchingEngine, QueueFull
from polymodal.engine.sampling import SamplingParams, choice_seed
from polymodal.errors import UserError, check_context_length
from polymodal.serve.errors import APIError, api_error, request_field
from polymodal.serve.media import MediaLimits, decode_audio, decode_image, decode_series
from polymodal.serve.pictures import image_part
from polymodal.serve.schemas import ChatRequest

# Tokenizers and image processors are shared by all requests; encoding runs in the thread
# pool, one prompt at a time, as a fast tokenizer must not be used by two threads at once.
_ENCODING = threading.Lock()


async def start(engine: BatchingEngine, model, body: ChatRequest, limits: MediaLimits) -> list:
    """Validate, decode and encode the request off the event loop, then queue all of its
    `n` choices or none. Raises APIError (4xx) naming the field at fault."""
    unsupported = body.unsupported()
    if unsupported:
        raise APIError(400, unsupported[1], param=unsupported[0])
    if body.n > engine.max_queue:
        raise APIError(400, f"n is {body.n}; this server queues at most {engine.max_queue}", param="n")
    encoded = await run_in_threadpool(_encode, engine, model, body, limits)
    try:
        params = [_params(engine, body, len(encoded["input_ids"]), index) for index in range(body.n)]
        return engine.submit_many(encoded, params)
    except (QueueFull, UserError) as error:
        raise api_error(error, request_field(error, body.max_tokens_field())) from None


def _encode(engine: BatchingEngine, model, body: ChatRequest, limits: MediaLimits) -> dict:
    prompt = to_prompt(body, model, limits)
    with _ENCODING:
        try:
            return engine.encode(prompt)
        except UserError as error:
            raise api_error(error, "messages") from None


def _params(engine: BatchingEngine, body: ChatRequest, prompt_tokens: int, index: int) -> SamplingParams:
    """Choice `index`'s sampling; without a length limit, up to the room left in the context.

    Raises:
        ContextLengthError: the prompt plus the limit asked (or the prompt alone) fills the context.
        ConfigError: a sampling value out of range (the schema's ranges should have caught it).
    """
    field = body.max_tokens_field()
    wanted = getattr(body, field) if field else max(1, engine.max_length - prompt_tokens)
    check_context_length(prompt_tokens, wanted, engine.max_length, asked_as=field)
    return SamplingParams(
        max_new_tokens=wanted, temperature=body.temperature, top_p=body.top_p,
        seed=None if body.seed is None else choice_seed(body.seed, index), stop=list(body.stop or []),
        logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0)


def to_prompt(body: ChatRequest, model, limits: MediaLimits) -> dict:
    """OpenAI messages -> {"messages": [...]} whose content is a list of parts: text, decoded
    images (PIL), clips (WAV bytes, from `input_audio` parts) and series (the encoder's
    input, from `input_series` parts), as `processing.processor` reads them: media come
    from media parts alone, and `<image>` typed in a text part is text. Decodes media: slow,
    so callers on the event loop run it in a thread."""
    messages, counts = [], {"image": 0, "audio": 0, "series": 0}
    for m, message in enumerate(body.messages):
        parts = [media_part(part, f"messages[{m}].content[{p}]", limits, counts, model)
                 for p, part in enumerate(message.content or [])]
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": parts})
    if counts["image"] and "image" not in model.encoders:
        raise APIError(400, "this model takes no images; remove them", param="messages")
    if counts["audio"] and "audio" not in model.encoders:
        raise APIError(400, "this model takes no audio; remove the input_audio parts", param="messages")
    return {"messages": messages}


def media_part(part, param: str, limits: MediaLimits, counts: dict[str, int], model=None) -> dict:
    """One OpenAI content part -> the processor's part; counts media against the limits."""
    if part.type == "text":
        return {"type": "text", "text": part.text or ""}
    if part.type == "input_series":
        return series_part(part, param, limits, counts, model)
    if part.type == "input_audio":
        if part.input_audio is None:
            raise APIError(400, 'an input_audio part needs "input_audio": {"data": ..., "format": "wav"}',
                           param=f"{param}.input_audio")
        if counts["audio"] >= limits.max_audio:
            raise APIError(400, f"too many audio clips: at most {limits.max_audio} per request",
                           param=param, code="too_many_audio")
        counts["audio"] += 1
        return {"type": "audio", "audio": decode_audio(part.input_audio.data, part.input_audio.format,
                                                       limits, f"{param}.input_audio")}
    if part.image_url is None:
        raise APIError(400, 'an image_url part needs "image_url": {"url": ...}', param=f"{param}.image_url")
    if counts["image"] >= limits.max_images:
        raise APIError(400, f"too many images: at most {limits.max_images} per request",
                       param=param, code="too_many_images")
    counts["image"] += 1
    return {"type": "image", "image": decode_image(part.image_url.url, limits, f"{param}.image_url.url")}


def series_part(part, param: str, limits: MediaLimits, counts: dict[str, int], model) -> dict:
    """An `input_series` part -> the processor's part holding the encoder's input
    [channels, length] (NaN padding, `processing.series.pad_series`), made from the JSON
    array in memory (no file). A series longer than the encoder's length keeps its last
    `length` steps (`processing.series.crop_series`); one wider than the encoder takes is a
    400 naming the part's data, as is one over the server's limits."""
    if part.input_series is None:
        raise APIError(400, 'an input_series part needs "input_series": {"data": [[...], ...]}',
                       param=f"{param}.input_series")
    media = model.processor.media if model is not None else {}
    if "series" not in media:
        raise APIError(400, "this model takes no series; remove the input_series parts", param="messages")
    if counts["series"] >= limits.max_series:
        raise APIError(400, f"too many series: at most {limits.max_series} per request",
                       param=param, code="too_many_series")
    counts["series"] += 1
    where = f"{param}.input_series.data"
    values = decode_series(part.input_series.data, limits, where)  # [T, C]
    try:
        return {"type": "series", "series": media["series"].load(values)}
    except UserError as error:  # wider than the encoder takes
        raise APIError(400, str(error), param=where) from None


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
            logprobs = []
            while True:
                kind, value = await next_event(request, http)
                if kind == "error":
                    raise APIError(500, "generation failed", kind="server_error")
                if kind == "logprobs":
                    logprobs.extend(value)
                if kind == "done":
                    break
            message = {"role": "assistant", "content": value.text}
            if value.images:  # drawn: the extension field (see the module's docstring)
                message["images"] = [image_part(image) for image in value.images]
            choices.append({"index": index, "message": message, "finish_reason": value.finish_reason,
                            "logprobs": {"content": logprobs} if body.logprobs else None})
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
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`; with
    `logprobs`, each chunk carries the entries of the tokens whose text it brings."""
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(index: int, delta: dict, finish: str | None = None, usage: dict | None = None,
              logprobs: list | None = None) -> str:
        choice = {"index": index, "delta": delta, "finish_reason": finish}
        if body.logprobs:
            choice["logprobs"] = {"content": logprobs or []}
        data = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": [] if index < 0 else [choice]}
        if usage is not None:
            data["usage"] = usage
        return f"data: {json.dumps(data)}\n\n"

    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    try:
        for index, request in enumerate(requests):
            yield chunk(index, {"role": "assistant", "content": ""})
            pending = []
            while True:
                kind, value = await next_event(request, http)
                if kind == "logprobs":
                    pending.extend(value)
                elif kind == "text":
                    yield chunk(index, {"content": value}, logprobs=pending)
                    pending = []
                elif kind == "image":
                    yield chunk(index, {"images": [image_part(value)]})
                elif kind == "error":
                    yield f"data: {json.dumps(APIError(500, 'generation failed', 'server_error').body())}\n\n"
                    break
                else:
                    usage["prompt_tokens"] = value.prompt_tokens
                    usage["completion_tokens"] += value.completion_tokens
                    yield chunk(index, {}, value.finish_reason, logprobs=pending)
                    break
        if (body.stream_options or {}).get("include_usage"):
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            yield chunk(-1, {}, usage=usage)
        yield "data: [DONE]\n\n"
    finally:
        for request in requests:
            request.cancel()
