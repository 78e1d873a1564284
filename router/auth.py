"""The router's bearer-key guard, as plain ASGI middleware (cheap per request); the check
itself is ``radixfleet.http_auth``, shared with the engine's server."""

from __future__ import annotations

import json

from radixfleet.http_auth import BearerKey


class BearerAuth:
    """Answers 401 unless ``Authorization: Bearer <key>``; ``/health`` stays open."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.key = BearerKey(api_key)

    async def __call__(self, scope, receive, send) -> None:
        reason = self.key.refusal(scope)
        if reason is None:
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": {"message": f"Unauthorized: {reason}", "type": "router_error", "code": 401}}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]})
        await send({"type": "http.response.body", "body": body})
