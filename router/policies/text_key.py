"""The routing key of a request: the text whose prefix the worker will have cached.

One extractor per proxied route (a registry, keyed by path). Chat requests are keyed by
the whole rendered conversation (every message's role and content, in order), so that
multi-turn chats with the same history follow the same worker, not only the same first
message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "".join(value)  # a batch of prompts: key on their concatenation
    return str(value)


def _content_text(content: Any) -> str:
    """Message content is a string or a list of parts ({"type": "text", "text": ...})."""
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return _as_text(content)


def render_chat(messages: Any) -> str:
    """``role: content`` per message, newline separated (a stable, template-free rendering)."""
    if not isinstance(messages, list):
        return _as_text(messages)
    parts = []
    for m in messages:
        if isinstance(m, dict):
            parts.append(f"{m.get('role', '')}: {_content_text(m.get('content'))}\n")
        else:
            parts.append(str(m))
    return "".join(parts)


def _generate(body: dict) -> str:
    text = body.get("text")
    return _as_text(text) if text is not None else _as_text(body.get("input_ids"))


TEXT_KEYS: dict[str, Callable[[dict], str]] = {
    "/generate": _generate,
    "/v1/completions": lambda body: _as_text(body.get("prompt")),
    "/v1/chat/completions": lambda body: render_chat(body.get("messages")),
    "/v1/embeddings": lambda body: _as_text(body.get("input")),
    "/encode": _generate,  # the same text / input_ids fields
    "/v1/score": lambda body: _as_text(body.get("query")),  # items share the query: one worker
}


def text_key(route: str, body: Any) -> str:
    """The routing text for ``body`` sent to ``route`` ("" when there is none)."""
    if not isinstance(body, dict):
        return ""
    extract = TEXT_KEYS.get(route)
    return extract(body) if extract else ""
