"""The HTTP API: OpenAI's chat completions (plain and streamed), models, embeddings,
health and metrics, and the web chat page at `/`.

    app = create_app(model, "easy-vqa", BatchingEngine(model).start(), MediaLimits())
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from polymodal.engine.batching import BatchingEngine, Finished, QueueFull
from polymodal.engine.sampling import SamplingParams
from polymodal.errors import UserError
from polymodal.serve.errors import APIError
from polymodal.serve.media import MediaLimits, decode_image
from polymodal.serve.metrics import ServerMetrics
from polymodal.serve.schemas import ChatRequest, EmbeddingRequest

DEFAULT_MAX_TOKENS = 256
PAGE = Path(__file__).parent / "static" / "index.html"


def create_app(model, model_name: str, engine: BatchingEngine | None, limits: MediaLimits,
               max_body_bytes: int = 20 * 1024 * 1024) -> FastAPI:
    app = FastAPI(title="polymodal", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics(engine)
    if engine is not None:
        def finished(request, done: Finished) -> None:
            metrics.prompt_tokens.inc(done.prompt_tokens)
            metrics.completion_tokens.inc(done.completion_tokens)
            metrics.latency.observe(time.perf_counter() - request.submitted)
        engine.on_finish = finished
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    _add_error_handlers(app, metrics)

    @app.get("/health")
    def health() -> dict:
        alive = engine is None or engine.thread.is_alive()
        return {"status": "ok" if alive else "engine stopped",
                "running": engine.running if engine else 0, "queued": engine.queue_depth if engine else 0}

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "polymodal"}]}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request):
        if engine is None:
            raise APIError(400, "this model does not generate text (a dual encoder); use /v1/embeddings")
        prompt = to_prompt(body, model, limits)
        requests = [submit(engine, prompt, body, index) for index in range(body.n)]
        metrics.requests.labels("chat", "200").inc()
        if body.stream:
            return StreamingResponse(stream_chunks(body, model_name, requests, http),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await complete(body, model_name, requests, http)

    @app.post("/v1/embeddings")
    def embeddings(body: EmbeddingRequest) -> dict:
        return embed(model, model_name, body, limits)

    return app


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


class BodyLimit:
    """Refuses request bodies over `max_bytes` (413) before they are read whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or {}).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_error(send, APIError(413, f"request body is over {self.max_bytes} bytes"))
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise APIError(413, f"request body is over {self.max_bytes} bytes")
            return message

        try:
            await self.app(scope, limited, send)
        except APIError as error:
            await _send_error(send, error)


async def _send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def respond(error: APIError) -> JSONResponse:
        metrics.requests.labels("any", str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        return respond(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return respond(APIError(400, "the request body is not valid JSON"))
        return respond(APIError(400, f"{where or 'body'}: {first.get('msg', 'invalid')}", param=where or None))

    @app.exception_handler(HTTPException)
    async def http_error(_, error: HTTPException):
        return respond(APIError(error.status_code, str(error.detail), kind="invalid_request_error"))

    @app.exception_handler(Exception)
    async def crashed(_, error: Exception):
        return respond(APIError(500, "internal server error", kind="server_error"))
