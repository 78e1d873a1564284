"""Tool-call parsers: model output text → (remaining content, tool calls).

Two formats, picked by name from ``TOOL_PARSERS`` (``--tool-call-parser``):

- ``qwen25``: Qwen2.5 / Hermes style, one JSON object per ``<tool_call>…</tool_call>`` block,
  ``{"name": ..., "arguments": {...}}``; text outside the blocks is content.
- ``llama3``: Llama-3.x JSON style, the whole reply is ``{"name": ..., "parameters": {...}}``
  (optionally after ``<|python_tag|>``), several calls separated by ``;``.

A parser never raises on model output: text that is not a well-formed call stays content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (the OpenAI wire format)

    def to_openai(self, index: int | None = None) -> dict:
        out = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
               "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out["index"] = index
        return out


def _call_from_obj(obj: object, known: set[str] | None, args_keys: tuple[str, ...]) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if known is not None and obj["name"] not in known:
        return None
    args = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models emit the arguments already as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolParser:
    name = ""

    def parse(self, text: str, tool_names: set[str] | None = None) -> tuple[str, list[ToolCall]]:
        """Return (content without the calls, calls); ``tool_names`` restricts accepted names."""
        raise NotImplementedError

    def may_contain_call(self, text: str) -> bool:
        """Whether ``text`` could be (the start of) a tool call: streaming then holds it back."""
        raise NotImplementedError


class Qwen25Parser(ToolParser):
    name = "qwen25"
    START, END = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str, tool_names: set[str] | None = None) -> tuple[str, list[ToolCall]]:
        if self.START not in text:
            return text, []
        calls: list[ToolCall] = []
        kept: list[str] = []
        pos = 0
        for m in self._BLOCK.finditer(text):
            try:
                call = _call_from_obj(json.loads(m.group(1)), tool_names, ("arguments", "parameters"))
            except json.JSONDecodeError:
                call = None
            if call is None:
                continue  # malformed block: leave it in the content
            kept.append(text[pos:m.start()])
            pos = m.end()
            calls.append(call)
        kept.append(text[pos:])
        return "".join(kept).strip() if calls else text, calls

    def may_contain_call(self, text: str) -> bool:
        return self.START in text or any(text.endswith(self.START[:k]) for k in range(1, len(self.START)))


class Llama3JsonParser(ToolParser):
    name = "llama3"
    TAG = "<|python_tag|>"

    def parse(self, text: str, tool_names: set[str] | None = None) -> tuple[str, list[ToolCall]]:
        body = text.strip()
        prefix = ""
        if self.TAG in body:
            prefix, body = body.split(self.TAG, 1)
            body = body.strip()
        if not body.startswith("{"):
            return text, []
        calls: list[ToolCall] = []
        decoder = json.JSONDecoder()
        pos = 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                return text, []
            call = _call_from_obj(obj, tool_names, ("parameters", "arguments"))
            if call is None:
                return text, []
            calls.append(call)
            pos = end
            while pos < len(body) and body[pos] in " \t\n;":
                pos += 1
        return prefix.strip(), calls

    def may_contain_call(self, text: str) -> bool:
        stripped = text.lstrip()
        return self.TAG in text or stripped.startswith("{") or stripped == ""


TOOL_PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (Qwen25Parser, Llama3JsonParser)}


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; choose one of {', '.join(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]()


def detect_tool_parser(chat_template: str | None) -> str:
    """Guess the parser from the chat template's tool-call syntax (``qwen25`` by default)."""
    if chat_template and ("<|python_tag|>" in chat_template or "ipython" in chat_template):
        return "llama3"
    return "qwen25"
