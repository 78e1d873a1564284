"""The bearer-key check of the engine's HTTP server and the router, written once.

Both answer 401 to any request but ``GET /health`` unless it carries ``Authorization: Bearer
<key>``; each renders the 401 in its own error shape. Standard library only, so the router
imports it without the engine (and torch), and the engine without the router.
"""

from __future__ import annotations

import hmac

OPEN_PATHS = frozenset({"/health"})
MISSING = "missing API key: send 'Authorization: Bearer <key>'"
WRONG = "invalid API key"


class BearerKey:
    """The expected ``Authorization`` value, compared in constant time."""

    def __init__(self, api_key: str) -> None:
        assert api_key, "an empty API key would let every request in"
        self._expected = f"Bearer {api_key}".encode()

    def refusal(self, scope: dict) -> str | None:
        """Why the ASGI request ``scope`` gets a 401, or None when it may pass."""
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return None
        # ASGI servers lower-case header names.
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if hmac.compare_digest(given, self._expected):
            return None
        return WRONG if given else MISSING
