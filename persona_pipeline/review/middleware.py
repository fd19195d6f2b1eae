"""ASGI middleware of the review form: a body size limit enforced while the body streams in, and
the security headers on every response."""

from __future__ import annotations

import json
from typing import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(Exception):
    """Raised from `receive` when a streamed body passes the limit."""


def _is_api(scope: Scope) -> bool:
    return str(scope.get("path", "")).startswith("/api/")


ErrorPage = Callable[[Scope, int, str], bytes]


async def _error(scope: Scope, send: Send, status: int, message: str, page: ErrorPage | None) -> None:
    """JSON under /api/; elsewhere the form's styled error page when `page` renders one, else text."""
    if _is_api(scope):
        body, ctype = json.dumps({"error": message}).encode(), b"application/json"
    elif page is not None:
        body, ctype = page(scope, status, message), b"text/html; charset=utf-8"
    else:
        body, ctype = message.encode(), b"text/plain; charset=utf-8"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`: at once from Content-Length, else while it streams in,
    so nothing ever parses (or buffers) more than the limit. `error_page(scope, status, message)`
    renders the answer for pages (web.error_page_body: styled, with the way back)."""

    def __init__(self, app: ASGIApp, max_bytes: int, error_page: ErrorPage | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.error_page = error_page

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"The request body is over the limit of {self.max_bytes} bytes."
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await _error(scope, send, 400, f"Content-Length {value.decode('latin-1')[:40]!r} is not a number",
                                 self.error_page)
                    return
                if length > self.max_bytes:
                    await _error(scope, send, 413, too_large, self.error_page)
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:  # too late to change the status; the connection just ends
                raise
            await _error(scope, send, 413, too_large, self.error_page)

SECURITY_HEADERS = [
    # Only our own files: no inline script, no framing, forms post only here.
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                 b"frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def add_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, add_headers)
