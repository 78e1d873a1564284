"""Bearer-key check for the router's own routes, as plain ASGI middleware (cheap per request)."""

from __future__ import annotations

import hmac
import json

OPEN_PATHS = frozenset({"/health"})


class BearerAuth:
    """Answers 401 unless ``Authorization: Bearer <key>``; ``/health`` stays open."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if hmac.compare_digest(given, self._expected):
            await self.app(scope, receive, send)
            return
        reason = "missing Authorization header" if not given else "invalid API key"
        body = json.dumps({"error": {"message": f"Unauthorized: {reason}", "type": "router_error", "code": 401}}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]})
        await send({"type": "http.response.body", "body": body})
