"""Chat messages → prompt text, through the tokenizer's chat template or ``--chat-template``."""

from __future__ import annotations

import json
import os
from typing import Any


def load_chat_template(path_or_text: str | None) -> str | None:
    """A Jinja template from a file path, or the text itself when it is not a file."""
    if path_or_text is None:
        return None
    if os.path.isfile(path_or_text):
        with open(path_or_text, encoding="utf-8") as f:
            return f.read()
    if "{%" in path_or_text or "{{" in path_or_text:
        return path_or_text
    raise ValueError(f"--chat-template {path_or_text!r} is neither a file nor a Jinja template")


def _text_content(content: Any, where: str) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"{where}: content part of type {kind!r} is not supported "
                                 "(this model takes text only)")
            parts.append(part.get("text", ""))
        return "".join(parts)
    raise ValueError(f"{where}: content must be a string or a list of text parts")


def normalize_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages → plain dicts a Hugging Face template understands.

    Content parts are joined into one string; a tool call's ``arguments`` JSON text becomes
    a dict (templates render it with ``tojson``).
    """
    if not messages:
        raise ValueError("messages must not be empty")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        role = msg.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ValueError(f"{where}: unknown role {role!r}")
        m: dict[str, Any] = {"role": "system" if role == "developer" else role,
                             "content": _text_content(msg.get("content"), where)}
        if m["content"] is None:
            m["content"] = ""
        if role == "tool" and msg.get("tool_call_id") is not None:
            m["tool_call_id"] = msg["tool_call_id"]
        if msg.get("name") is not None:
            m["name"] = msg["name"]
        if role == "assistant" and msg.get("tool_calls"):
            calls = []
            for call in msg["tool_calls"]:
                fn = dict(call.get("function") or {})
                args = fn.get("arguments")
                if isinstance(args, str):
                    try:
                        fn["arguments"] = json.loads(args)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{where}: tool call arguments are not JSON: {e}") from None
                calls.append({"id": call.get("id"), "type": "function", "function": fn})
            m["tool_calls"] = calls
        out.append(m)
    return out


def render_chat(tokenizer: Any, messages: list[dict], template: str | None, tools: list[dict] | None = None,
                add_generation_prompt: bool = True, continue_final_message: bool = False,
                **template_kwargs: Any) -> str:
    """Render ``messages`` to prompt text; ValueError when no template is available."""
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; start the server with --chat-template")
    try:
        return tokenizer.apply_chat_template(
            normalize_messages(messages), tools=tools or None, chat_template=template, tokenize=False,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message, **template_kwargs)
    except ValueError:
        raise
    except Exception as e:  # jinja2 TemplateError and friends: the user's messages did not fit
        raise ValueError(f"the chat template failed on these messages: {e}") from e
