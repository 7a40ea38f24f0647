"""ASGI middleware: API keys, the body size limit, HTTP metrics.

Plain ASGI classes rather than ``BaseHTTPMiddleware`` so that streamed responses pass through
untouched and a client's disconnect still reaches the streaming task.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from specdecode.server.errors import APIError, bad_request, body_too_large, unauthorized
from specdecode.server.metrics import Metrics

PROTECTED_PREFIXES = ("/v1/", "/metrics")  # the page and /health stay open


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class ApiKeyAuth:
    """401 unless ``Authorization: Bearer <key>`` holds one of ``keys`` (none: open server)."""

    def __init__(self, app: ASGIApp, keys: Collection[str]) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._refused(scope):
            await unauthorized().response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refused(self, scope: Scope) -> bool:
        if scope["type"] != "http" or not self.keys or not self._protected(scope["path"]):
            return False
        return not self._authorized(_header(scope, b"authorization"))

    @staticmethod
    def _protected(path: str) -> bool:
        return path.startswith(PROTECTED_PREFIXES)

    def _authorized(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip().encode()
        # compare_digest with every key, so that the time taken says nothing about which matched
        return sum(hmac.compare_digest(given, key) for key in self.keys) > 0


class BodyLimit:
    """413 for a request body over ``max_bytes``, declared or streamed.

    The body is read here (up to the limit) and replayed to the app, so that a chunked upload
    without a Content-Length cannot get past the limit either.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._check_declared(_header(scope, b"content-length"))
        body = None if error else await self._read(receive)
        if error is None and body is None:
            error = body_too_large(self.max_bytes)
        if error is not None:
            await error.response()(scope, receive, send)
            return
        await self.app(scope, _replay(body or b"", receive), send)

    def _check_declared(self, length: str | None) -> APIError | None:
        if length is None:
            return None
        if not length.strip().isdigit():
            return bad_request(f"invalid Content-Length header {length!r}")
        return body_too_large(self.max_bytes) if int(length) > self.max_bytes else None

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it grows past the limit."""
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away; the app will see it when it reads
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, then whatever the client sends (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class HttpMetrics:
    """Counts responses by method, route and status (unknown paths count as ``other``, so that
    random URLs cannot grow the metrics without bound)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Collection[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = frozenset(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # if the app fails before it starts a response

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.http_response(scope["method"], self._route(scope), status)

    def _route(self, scope: Scope) -> str:
        """The matched route's template (``/v1/models/{model_id}``), else a known path."""
        matched = getattr(scope.get("route"), "path", None)
        if isinstance(matched, str):
            return matched
        return scope["path"] if scope["path"] in self.routes else "other"
