"""The HTTP API: OpenAI's chat completions (plain and streamed), models, embeddings, image
generation (a model that draws), health and metrics, and the web chat page at `/`.

    app = create_app(model, "easy-vqa", BatchingEngine(model).start(), MediaLimits())
    uvicorn.Server(server_config(app, "127.0.0.1", 8000, ConnectionLimits())).run()

Nothing a request does runs on the event loop for long: bodies are parsed, images decoded
and prompts encoded in the thread pool, the model runs on the engine's thread.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from polymodal.engine.batching import BatchingEngine, Finished
from polymodal.serve.chat import complete, start, stream_chunks
from polymodal.serve.connections import ConnectionLimits, server_config  # noqa: F401 - re-exported
from polymodal.serve.embeddings import embed
from polymodal.serve.errors import APIError, BodyLimit, validation_error
from polymodal.serve.images import generate as generate_images
from polymodal.serve.images import image_size
from polymodal.serve.media import MediaLimits
from polymodal.serve.metrics import ServerMetrics
from polymodal.serve.schemas import ChatRequest, EmbeddingRequest, ImageGenerationRequest

PAGE = Path(__file__).parent / "static" / "index.html"


def create_app(model, model_name: str, engine: BatchingEngine | None, limits: MediaLimits,
               max_body_bytes: int = 20 * 1024 * 1024, body_timeout: float | None = 60.0) -> FastAPI:
    """The ASGI application. Request bodies over `max_bytes` get 413, bodies not received
    within `body_timeout` seconds of the headers 408 (None: no deadline)."""
    app = FastAPI(title="polymodal", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics(engine)
    if engine is not None:
        def finished(request, done: Finished) -> None:
            metrics.prompt_tokens.inc(done.prompt_tokens)
            metrics.completion_tokens.inc(done.completion_tokens)
            metrics.latency.observe(time.perf_counter() - request.submitted)
        engine.on_finish = finished
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, timeout=body_timeout)
    _add_error_handlers(app, metrics)

    @app.get("/health")
    def health() -> dict:
        alive = engine is None or engine.thread.is_alive()
        return {"status": "ok" if alive else "engine stopped",
                "running": engine.running if engine else 0, "queued": engine.queue_depth if engine else 0}

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    card = {"id": model_name, "object": "model", "created": 0, "owned_by": "polymodal"}
    if engine is not None and engine.codes is not None:  # an extension: what a drawn image takes
        card["image_output"] = {"size": image_size(model), "tokens": engine.codes.num_codes + 2}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    def model_card(model_id: str) -> dict:
        if model_id != model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server has {model_name!r}",
                           param="model", code="model_not_found")
        return card

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text()

    @app.post("/v1/chat/completions")
    async def chat(http: Request):
        body = await parse(http, ChatRequest)
        if engine is None:
            raise APIError(400, "this model does not generate text (a dual encoder); use /v1/embeddings")
        requests = await start(engine, model, body, limits)
        try:
            metrics.requests.labels("chat", "200").inc()
            if body.stream:
                return StreamingResponse(stream_chunks(body, model_name, requests, http),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            return await complete(body, model_name, requests, http)
        except BaseException:
            for request in requests:  # nobody will read them
                request.cancel()
            raise

    @app.post("/v1/images/generations")
    async def images(http: Request) -> dict:
        body = await parse(http, ImageGenerationRequest)
        response = await generate_images(engine, model, body, http)
        metrics.requests.labels("images", "200").inc()
        return response

    @app.post("/v1/embeddings")
    async def embeddings(http: Request) -> dict:
        body = await parse(http, EmbeddingRequest)
        return await run_in_threadpool(embed, model, model_name, body, limits)

    return app


async def parse(http: Request, schema: type[BaseModel]):
    """The request body as `schema`, parsed in the thread pool (a 20 MB body takes the loop
    a while); a 400 naming the field as the client wrote it otherwise."""
    raw = await http.body()

    def validate():
        try:
            return schema.model_validate_json(raw)
        except ValidationError as error:
            errors = error.errors(include_url=False, include_context=False, include_input=False)
            try:
                data = json.loads(raw)
            except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
                data = None
            return validation_error(errors, data)

    result = await run_in_threadpool(validate)
    if isinstance(result, APIError):
        raise result
    return result


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def respond(error: APIError) -> JSONResponse:
        metrics.requests.labels("any", str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        return respond(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, error: RequestValidationError):
        return respond(validation_error(list(error.errors()), None))

    @app.exception_handler(HTTPException)
    async def http_error(_, error: HTTPException):
        return respond(APIError(error.status_code, str(error.detail), kind="invalid_request_error"))

    @app.exception_handler(Exception)
    async def crashed(_, error: Exception):
        return respond(APIError(500, "internal server error", kind="server_error"))
