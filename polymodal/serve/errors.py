"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}} with an HTTP status.
Messages are written for the client: never a stack trace, a memory address or a path."""

from __future__ import annotations


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
