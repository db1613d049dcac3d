"""The HTTP API: OpenAI's chat completions (plain and streamed), models, embeddings,
health and metrics, and the web chat page at `/`.

    app = create_app(model, "easy-vqa", BatchingEngine(model).start(), MediaLimits())
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from polymodal.engine.batching import BatchingEngine, Finished
from polymodal.serve.chat import complete, stream_chunks, submit, to_prompt
from polymodal.serve.embeddings import embed
from polymodal.serve.errors import APIError, BodyLimit
from polymodal.serve.media import MediaLimits
from polymodal.serve.metrics import ServerMetrics
from polymodal.serve.schemas import ChatRequest, EmbeddingRequest

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
