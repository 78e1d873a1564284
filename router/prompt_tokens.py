"""A request's prompt token ids, computed in the router as the engine computes them.

The precise policy (``policies/precise.py``) hashes these ids into KV-event blocks, so they
must be the engine's ids exactly: the same tokenizer files, the same chat template and the
same calls as ``engine/server/openai_serving.py`` (chat: render the template, then encode
without special tokens) and ``engine/managers/tokenizer_manager.py`` (text: ``encode``).
Only the ``tokenizers``-backed ``PreTrainedTokenizerFast`` is loaded: no torch in the
router process (``AutoTokenizer`` would import it through the model config).

Without a tokenizer folder of its own (a router pod has no model), the router fetches the
tokenizer from the first worker that publishes KV events (engine ``GET /tokenizer_files``,
``fetch_tokenizer``), so the two cannot disagree.

A request this cannot tokenize (a batch, a malformed body, a template error) gets ``None``
and is routed without token ids; the engine answers its own errors.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

from radixfleet.engine.server.chat_template import load_chat_template, render_chat

log = logging.getLogger(__name__)


def _ids_or_none(value: Any) -> list[int] | None:
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value
    return None


class PromptTokenizer:
    """Token ids of the proxied routes' prompts, by route (a registry, as ``text_key.py``)."""

    def __init__(self, path: str, chat_template: str | None = None) -> None:
        from transformers import PreTrainedTokenizerFast  # tokenizers-backed; never imports torch

        try:
            self.tok = PreTrainedTokenizerFast.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load the tokenizer at {path!r}: {e}") from None
        self.template = load_chat_template(chat_template)
        self._routes: dict[str, Callable[[dict], list[int] | None]] = {
            "/generate": self._generate,
            "/v1/completions": self._completion,
            "/v1/chat/completions": self._chat,
        }

    def token_ids(self, route: str, body: Any) -> list[int] | None:
        fn = self._routes.get(route)
        if fn is None or not isinstance(body, dict):
            return None
        try:
            return fn(body)
        except Exception as e:  # a body the engine will refuse; it answers the 400, we route by text
            log.debug("no prompt ids for %s: %s", route, e)
            return None

    def _text(self, text: Any) -> list[int] | None:
        return self.tok.encode(text) if isinstance(text, str) and text else None

    def _generate(self, body: dict) -> list[int] | None:
        return _ids_or_none(body.get("input_ids")) or self._text(body.get("text"))

    def _completion(self, body: dict) -> list[int] | None:
        prompt = body.get("prompt")
        return _ids_or_none(prompt) or self._text(prompt)

    def _chat(self, body: dict) -> list[int] | None:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return None
        tools = body.get("tools") if body.get("tool_choice") != "none" else None
        prompt = render_chat(self.tok, messages, self.template, tools=tools or None,
                             continue_final_message=bool(body.get("continue_final_message")),
                             **(body.get("chat_template_kwargs") or {}))
        return self.tok(prompt, add_special_tokens=False).input_ids


async def fetch_tokenizer(get: Callable[[str], Any], url: str) -> PromptTokenizer:
    """The tokenizer of the engine at ``url`` (``get(path)`` awaits its HTTP answer:
    ``(status, bytes)``); ValueError when it has none to give."""
    status, content = await get(url + "/tokenizer_files")
    if status != 200:
        raise ValueError(f"{url}/tokenizer_files answered {status}: {content[:200]!r}")
    answer = json.loads(content)
    folder = tempfile.mkdtemp(prefix="radixfleet-router-tok-")
    for name, data in answer["files"].items():
        if os.path.basename(name) != name:
            raise ValueError(f"{url} sent a tokenizer file name with a path: {name!r}")
        with open(os.path.join(folder, name), "wb") as f:
            f.write(base64.b64decode(data))
    return await asyncio.to_thread(PromptTokenizer, folder, answer.get("chat_template"))
