"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}} with an HTTP status.
Messages are written for the client: never a stack trace, a memory address or a path."""

from __future__ import annotations

import asyncio
import json
import time

from polymodal.engine.batching import QueueFull
from polymodal.errors import ConfigError, ContextLengthError, UserError


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def api_error(error: Exception, param: str | None = None) -> APIError:
    """The HTTP answer to an error raised while handling a request, chosen by the error's
    type (never by its message text): a full queue is a 429 to retry, a prompt over the
    context a 400 `context_length_exceeded`, any other user's mistake a 400, anything else a
    500 that says no more. `param`: the request field the error is about."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, QueueFull):
        return APIError(429, "the server is busy; retry shortly", kind="rate_limit_error",
                        code="queue_full", headers={"Retry-After": "1"})
    if isinstance(error, ContextLengthError):
        return APIError(400, str(error), param=param, code="context_length_exceeded")
    if isinstance(error, UserError):
        return APIError(400, str(error), param=param)
    return APIError(500, "internal server error", kind="server_error")


def request_field(error: Exception, max_tokens_field: str | None) -> str:
    """The chat request's field an engine error is about, by the error's type and fields:
    the token limit for a prompt over the context (the messages when no limit was given),
    a sampling option by its name (`max_new_tokens` as the client spelled the limit)."""
    if isinstance(error, ContextLengthError):
        return max_tokens_field or "messages"
    if isinstance(error, ConfigError) and error.field:
        return (max_tokens_field or "max_tokens") if error.field == "max_new_tokens" else error.field
    return "messages"


def validation_error(errors: list[dict], data) -> APIError:
    """A pydantic error list -> a 400 naming the field as the client wrote it
    (`messages[0].content[1].image_url`), with a message in the client's terms."""
    if not errors:
        return APIError(400, "invalid request body")
    if any(e.get("type") == "json_invalid" for e in errors):
        return APIError(400, "the request body is not valid JSON")
    paths = [_real_path(e.get("loc", ()), data) for e in errors]
    # A union reports one error per member; the one that got deepest into the data
    # is about the member the client meant.
    best = max(range(len(errors)), key=lambda i: len(paths[i]))
    where = _param(paths[best])
    message = _message(errors[best])
    return APIError(400, f"{where or 'body'}: {message}", param=where or None)


def _real_path(loc, data) -> list:
    """The parts of a pydantic location that are fields or indexes of the data (union
    members' tags, like `str` or `list[str]`, are not)."""
    path, current = [], data
    for position, part in enumerate(loc):
        if part == "body" and position == 0:
            continue
        index = isinstance(part, int) and isinstance(current, list) and 0 <= part < len(current)
        if index or (isinstance(current, dict) and part in current):
            path.append(part)
            current = current[part]
        elif isinstance(current, dict) and position == len(loc) - 1 and isinstance(part, str):
            path.append(part)  # a missing field
            current = None
    return path


def _param(path: list) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _message(error: dict) -> str:
    kind, message = error.get("type", ""), error.get("msg", "invalid")
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "expected an object"
    if kind == "missing":
        return "is required"
    return message


class BodyLimit:
    """Refuses request bodies over `max_bytes` (413), with or without a Content-Length, and
    bodies not received within `timeout` seconds of the request's headers (408), as
    nginx's client_max_body_size and client_body_timeout do. The error is sent from here
    and the connection closed, whatever the application does with the body it was reading."""

    def __init__(self, app, max_bytes: int, timeout: float | None = None):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or {}).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_error(send, self._too_large())
        state = {"seen": 0, "done": False, "refused": False, "started": False}
        deadline = None if self.timeout is None else time.monotonic() + self.timeout

        async def refuse(error: APIError) -> dict:
            state["refused"] = True
            if not state["started"]:
                await _send_error(send, error)
            return {"type": "http.disconnect"}  # the application stops reading

        async def limited():
            if state["refused"]:
                return {"type": "http.disconnect"}
            if state["done"] or deadline is None:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    return await refuse(APIError(408, f"the request body did not arrive within "
                                                      f"{self.timeout:g} seconds", code="request_timeout"))
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                state["done"] = not message.get("more_body", False)
                if state["seen"] > self.max_bytes:
                    return await refuse(self._too_large())
            return message

        async def guarded_send(message):
            if state["refused"]:
                return  # the error response has been sent
            state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited, guarded_send)
        except Exception:
            if not state["refused"]:
                raise  # after a refusal the application's complaint about the body is moot

    def _too_large(self) -> APIError:
        return APIError(413, f"request body is over {self.max_bytes} bytes", code="request_too_large")


async def _send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    # Connection: close, as the rest of the body is never read.
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
