"""What every request passes first: the body size limit, the API key and the answer to unknown routes.

Request bodies over `max_body_bytes` get 413, and a body not uploaded within `body_timeout_s` gets 408 (a slow
client cannot hold a slot); with an API key configured every route but /health needs `Authorization: Bearer KEY`
(the scheme in any case, 401); unknown routes (404) and wrong methods (405) are answered OpenAI-style too; an
unexpected exception is logged with its traceback in the replica log and answered with a generic 500, never a
stack trace. A request whose client left (during upload or before the answer) is counted as status 499, the
convention for "client closed request", not as a server error.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import traceback
from collections.abc import Callable

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from radar.serve.errors import APIError

log = logging.getLogger("ray.serve")

OPEN_ROUTE = "/health"  # the liveness probe needs no key
CLIENT_GONE = 499


class _ClientGone(Exception):
    """The client disconnected while its body was being read."""


class Guard:
    """Pure ASGI middleware, outermost in the app: body size limit (413), bearer key (401), a generic 500 for any
    unhandled exception (traceback logged, never sent), and `count(route, status)` for every request (routes
    not in `routes` are counted as "other", so the label set stays bounded)."""

    def __init__(self, app: ASGIApp, routes: frozenset[str], api_key: str | None, max_body_bytes: int,
                 count: Callable[[str, int], None], body_timeout_s: float = 10.0):
        self.app, self.routes, self.api_key, self.limit, self.count = app, routes, api_key, max_body_bytes, count
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        route = (path[len(root):] if root and path.startswith(root) else path).rstrip("/") or "/"
        status = {"code": 500, "started": False}

        async def send_tracked(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            rejection = self._check_key(scope, route)
            if rejection is None:
                receive, rejection = await self._buffer_body(scope, receive)
            if rejection is not None:
                await rejection(scope, receive, send_tracked)
            else:
                await self.app(scope, receive, send_tracked)
        except (_ClientGone, asyncio.CancelledError) as exc:  # the client left: nobody to answer
            if not status["started"]:
                status["code"] = CLIENT_GONE
            if isinstance(exc, asyncio.CancelledError):
                raise
        except Exception:  # noqa: BLE001 - last line of defence: log it, answer a generic 500
            log.error("unhandled error on %s %s\n%s", scope.get("method"), path, traceback.format_exc())
            if not status["started"]:
                await APIError(500, "internal server error (details are in the server log)", "server_error",
                               "internal_error").response()(scope, receive, send_tracked)
        finally:
            self.count(route if route in self.routes else "other", status["code"])

    def _check_key(self, scope: Scope, route: str) -> JSONResponse | None:
        if self.api_key and route != OPEN_ROUTE:
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1").partition(" ")
            # RFC 9110: the scheme is case-insensitive ("bearer" works); the key is compared in constant time.
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
                return APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                "authentication_error", "invalid_api_key").response({"WWW-Authenticate": "Bearer"})
        return None

    async def _buffer_body(self, scope: Scope, receive: Receive) -> tuple[Receive, JSONResponse | None]:
        """Read the whole body (bounded) before the app sees it: (a `receive` that replays it, None), or
        (receive, a 413 response)."""
        too_big = APIError(413, f"request body exceeds {self.limit} bytes", code="request_too_large").response()
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return receive, too_big
        chunks, size, more = [], 0, True
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        while more:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except (asyncio.TimeoutError, TimeoutError):
                return receive, APIError(408, f"the request body was not received within {self.body_timeout_s:g}s",
                                         code="request_timeout").response({"Connection": "close"})
            if message["type"] != "http.request":  # the client went away mid-upload
                raise _ClientGone()
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return receive, too_big
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay, None


async def route_error_handler(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown routes (404) and wrong methods (405) in the OpenAI error shape."""
    message = {404: f"no route {request.url.path}", 405: f"{request.method} not allowed on {request.url.path}"}
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return APIError(exc.status_code, message.get(exc.status_code, str(exc.detail)), code=code).response()
