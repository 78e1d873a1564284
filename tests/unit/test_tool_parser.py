"""Tool-call parsers: Qwen2.5 ``<tool_call>`` blocks and Llama-3 JSON, on well-formed and
malformed model output (which must stay content, never raise)."""

from __future__ import annotations

import json

import pytest

from radixfleet.engine.server.tool_parser import (
    Llama3JsonParser,
    Qwen25Parser,
    detect_tool_parser,
    get_tool_parser,
)

NAMES = {"get_weather", "search"}


def args(call) -> dict:
    return json.loads(call.arguments)


def test_qwen_single_call_with_leading_text():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = Qwen25Parser().parse(text, NAMES)
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather"] and args(calls[0]) == {"city": "Paris"}


def test_qwen_two_calls_and_unterminated_last_block():
    text = ('<tool_call>{"name": "search", "arguments": {"q": "a"}}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}')
    content, calls = Qwen25Parser().parse(text, NAMES)
    assert content == "" and [c.name for c in calls] == ["search", "get_weather"]


def test_qwen_malformed_or_unknown_calls_stay_content():
    for text in ('<tool_call>{"name": "get_weather", "arguments": {broken</tool_call>',
                 '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
                 "Plain answer without tools."):
        content, calls = Qwen25Parser().parse(text, NAMES)
        assert calls == [] and content == text


def test_qwen_arguments_given_as_a_json_string():
    text = '<tool_call>{"name": "search", "arguments": "{\\"q\\": \\"x\\"}"}</tool_call>'
    _, calls = Qwen25Parser().parse(text, NAMES)
    assert args(calls[0]) == {"q": "x"}


def test_qwen_streaming_holdback():
    p = Qwen25Parser()
    assert not p.may_contain_call("Hello there")
    assert p.may_contain_call("Hello <tool")  # could be the start of <tool_call>
    assert p.may_contain_call("x <tool_call>{")


def test_llama3_single_and_multiple_calls():
    content, calls = Llama3JsonParser().parse('{"name": "get_weather", "parameters": {"city": "Oslo"}}', NAMES)
    assert content == "" and args(calls[0]) == {"city": "Oslo"}
    text = ('<|python_tag|>{"name": "search", "parameters": {"q": "a"}}; '
            '{"name": "get_weather", "parameters": {"city": "B"}}')
    _, calls = Llama3JsonParser().parse(text, NAMES)
    assert [c.name for c in calls] == ["search", "get_weather"]


@pytest.mark.parametrize("text", ["The answer is 4.", '{"name": "nope", "parameters": {}}',
                                  '{"name": "search", "parameters": {"q": 1}} trailing words',
                                  '{"not": "a call"}'])
def test_llama3_non_calls_stay_content(text):
    content, calls = Llama3JsonParser().parse(text, NAMES)
    assert calls == [] and content == text


def test_tool_call_openai_shape():
    (call,) = Qwen25Parser().parse('<tool_call>{"name": "search", "arguments": {}}</tool_call>', NAMES)[1]
    out = call.to_openai(0)
    assert out["type"] == "function" and out["index"] == 0 and out["id"].startswith("call_")
    assert out["function"] == {"name": "search", "arguments": "{}"}


def test_registry_and_detection():
    assert isinstance(get_tool_parser("llama3"), Llama3JsonParser)
    with pytest.raises(ValueError, match="qwen25"):
        get_tool_parser("nope")
    assert detect_tool_parser("{{ '<|python_tag|>' }}") == "llama3"
    assert detect_tool_parser("<tool_call>") == "qwen25"
    assert detect_tool_parser(None) == "qwen25"
