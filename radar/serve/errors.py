"""Errors as OpenAI answers them: {"error": {"message", "type", "code", "param"}} with an HTTP status."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from radar.serve.protocol import ErrorBody, ErrorResponse


class APIError(Exception):
    """An error answered as OpenAI-style JSON with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}
        self.body = ErrorResponse(error=ErrorBody(message=message, type=type, code=code, param=param))

    def response(self, headers: dict | None = None) -> JSONResponse:
        """The error as an HTTP response."""
        merged = {**self.headers, **(headers or {})}
        return JSONResponse(self.body.model_dump(), status_code=self.status, headers=merged)


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """One readable line from a pydantic error, and the first offending field."""
    parts, param = [], None
    for e in exc.errors(include_url=False):
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "json_invalid":
            parts.append(f"the body is not valid JSON ({e['msg']})")
            continue
        param = param or loc or None
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else f"the body must be a JSON object ({msg})")
    return "; ".join(parts) or "invalid request", param


async def api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    """FastAPI exception handler for APIError."""
    return exc.response()
