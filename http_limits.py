"""The request-body size limit of the engine's HTTP server and the router, written once.

Both answer 413 to a body over the limit, by ``Content-Length`` or counted while reading a
chunked body; each renders the 413 in its own error shape. Standard library only, like
``http_auth``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
BODY_METHODS = ("POST", "PUT", "PATCH")


def too_large_message(limit: int) -> str:
    return f"the request body is larger than {limit} bytes"


class BodyLimit:
    """ASGI middleware: ``reject(limit)`` (an ASGI response) for a body over ``limit`` bytes;
    otherwise the body is read here (handlers read all of it anyway) and replayed."""

    def __init__(self, app: Any, limit: int, reject: Callable[[int], Any]):
        self.app, self.limit, self.reject = app, limit, reject

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self.reject(self.limit)(scope, receive, send)
        if scope["method"] not in BODY_METHODS:
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self.reject(self.limit)(scope, receive, send)
            if not msg.get("more_body"):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: wait for http.disconnect

        await self.app(scope, replay, send)
