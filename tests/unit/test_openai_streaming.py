"""Chat streaming with tools (no model): text that may be a tool call is held back and
parsed when the choice ends; plain text streams as it comes."""

from __future__ import annotations

import json
from types import SimpleNamespace

from radixfleet.engine.server.openai_protocol import ChatRequest, parse_request
from radixfleet.engine.server.openai_serving import _ChatJob

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


class FakeTok:
    chat_template = "{{ messages }}"

    def apply_chat_template(self, messages, **kw):
        return "prompt"

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[1, 2, 3])


def job(parser: str = "qwen25", **kw) -> _ChatJob:
    tm = SimpleNamespace(tokenizer=FakeTok(), context_length=100, model_name="m")
    state = SimpleNamespace(tm=tm, chat_template=None, tool_call_parser=parser, model_name="m")
    req = parse_request(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                      "stream": True, **kw})
    return _ChatJob.build(state, req)


def feed(j: _ChatJob, pieces: list[str]) -> list[dict]:
    out = j.start_chunks(0)
    for k, text in enumerate(pieces):
        last = k == len(pieces) - 1
        chunk = {"text": text, "output_ids": [k], "meta_info": {
            "finish_reason": {"type": "stop", "matched": 2} if last else None,
            "prompt_tokens": 3, "completion_tokens": k + 1}}
        out += j.stream_chunks(0, chunk)
    return [c["choices"][0] for c in out]


def test_plain_text_streams_immediately_with_tools_on():
    choices = feed(job(tools=TOOLS), ["Hello", " world", "!"])
    assert [c["delta"].get("content") for c in choices] == ["", "Hello", " world", "!", None]
    assert choices[-1]["finish_reason"] == "stop"


def test_qwen_tool_call_is_held_and_emitted_as_tool_calls():
    pieces = ["Sure. ", "<tool", "_call>", '{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}',
              "</tool_call>"]
    choices = feed(job(tools=TOOLS), pieces)
    contents = "".join(c["delta"].get("content") or "" for c in choices)
    assert contents == "Sure. "  # streamed before the call began; the call text never leaks
    calls = [tc for c in choices for tc in c["delta"].get("tool_calls", [])]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather" and calls[0]["index"] == 0
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert choices[-1]["finish_reason"] == "tool_calls"


def test_llama3_json_reply_becomes_a_tool_call():
    choices = feed(job("llama3", tools=TOOLS), ['{"name": "get_weather",', ' "parameters": {}}'])
    calls = [tc for c in choices for tc in c["delta"].get("tool_calls", [])]
    assert [tc["function"]["name"] for tc in calls] == ["get_weather"]


def test_named_tool_choice_turns_the_constrained_json_into_the_call():
    j = job(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(j.reqs[0].params.json_schema) == {"type": "object"}
    choices = feed(j, ['{"city":', ' "Rome"}'])
    calls = [tc for c in choices for tc in c["delta"].get("tool_calls", [])]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}
    assert choices[-1]["finish_reason"] == "tool_calls"


def test_tool_choice_none_streams_text_and_sends_no_tools_to_the_template():
    j = job(tools=TOOLS, tool_choice="none")
    assert j.tool_names is None
    choices = feed(j, ["<tool_call>", "x"])
    assert "".join(c["delta"].get("content") or "" for c in choices) == "<tool_call>x"
