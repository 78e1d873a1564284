"""OpenAI request → SGLang sampling parameters, forced tool schemas, logprob formatting."""

from __future__ import annotations

import json

import pytest

from radixfleet.engine.sampling.params import SamplingParams
from radixfleet.engine.server.openai_protocol import (
    ChatRequest,
    CompletionRequest,
    InvalidParam,
    chat_logprobs,
    completion_logprobs,
    forced_tool_schema,
    parse_request,
    sampling_params,
)

MSG = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                     "properties": {"a": {"type": "integer"}}}}}


def chat(**kw) -> ChatRequest:
    return parse_request(ChatRequest, {"model": "m", "messages": MSG, **kw})


def test_fields_map_to_sglang_names_and_are_accepted_by_sampling_params():
    req = chat(temperature=0.5, top_p=0.9, stop=["x"], seed=3, n=2, presence_penalty=0.1,
               frequency_penalty=0.2, top_k=5, min_p=0.1, repetition_penalty=1.1, min_tokens=2,
               stop_token_ids=[7], ignore_eos=True)
    params = sampling_params(req, 10)
    assert params == {"temperature": 0.5, "top_p": 0.9, "stop": ["x"], "seed": 3, "n": 2,
                      "presence_penalty": 0.1, "frequency_penalty": 0.2, "top_k": 5, "min_p": 0.1,
                      "repetition_penalty": 1.1, "stop_token_ids": [7], "ignore_eos": True,
                      "max_new_tokens": 10, "min_new_tokens": 2}
    SamplingParams.from_dict(params)  # every name is one the engine knows


def test_response_formats_become_json_schema_strings():
    assert "json_schema" not in sampling_params(chat(response_format={"type": "text"}), 5)
    obj = sampling_params(chat(response_format={"type": "json_object"}), 5)
    assert json.loads(obj["json_schema"]) == {"type": "object"}
    schema = {"type": "object", "properties": {"x": {"type": "string"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}
    assert json.loads(sampling_params(chat(response_format=fmt), 5)["json_schema"]) == schema
    with pytest.raises(InvalidParam, match="schema"):
        sampling_params(chat(response_format={"type": "json_schema", "json_schema": {"name": "s"}}), 5)
    with pytest.raises(InvalidParam, match="combined"):
        sampling_params(chat(response_format={"type": "json_object"}, regex="a+"), 5)


def test_unknown_and_invalid_fields_name_the_parameter():
    with pytest.raises(InvalidParam) as e:
        chat(frobnicate=1)
    assert e.value.param == "frobnicate"
    with pytest.raises(InvalidParam) as e:
        chat(response_format={"type": "yaml"})
    assert e.value.param.startswith("response_format")
    with pytest.raises(InvalidParam, match="n"):
        chat(n=0)
    chat(user="someone", store=False)  # accepted and ignored
    with pytest.raises(InvalidParam, match="JSON object"):
        parse_request(ChatRequest, [1, 2])


def test_completion_defaults_to_16_tokens():
    req = parse_request(CompletionRequest, {"model": "m", "prompt": "hi"})
    assert sampling_params(req, req.max_tokens)["max_new_tokens"] == 16


def test_forced_tool_schemas():
    tools = chat(tools=[TOOL]).tools
    assert forced_tool_schema(tools, "auto") == (None, None)
    schema, name = forced_tool_schema(tools, {"type": "function", "function": {"name": "f"}})
    assert name == "f" and schema == TOOL["function"]["parameters"]
    schema, name = forced_tool_schema(tools, "required")
    assert name is None and schema["type"] == "array" and schema["minItems"] == 1
    assert schema["items"]["anyOf"][0]["properties"]["name"]["enum"] == ["f"]
    with pytest.raises(InvalidParam, match="not in tools"):
        forced_tool_schema(tools, {"type": "function", "function": {"name": "g"}})
    with pytest.raises(InvalidParam, match="needs tools"):
        forced_tool_schema(None, "required")


class FakeTok:
    def decode(self, ids):
        return {1: "Hel", 2: "lo", 3: "X"}[ids[0]]


META = {"output_token_logprobs": [(-0.1, 1, None), (-0.2, 2, None)],
        "output_top_logprobs": [[(-0.1, 1, None), (-2.0, 3, None)], [(-0.2, 2, "lo"), (-3.0, 3, "X")]]}


def test_chat_logprobs_shape():
    out = chat_logprobs(FakeTok(), META, 2)
    assert [c["token"] for c in out["content"]] == ["Hel", "lo"]
    assert out["content"][0]["bytes"] == list(b"Hel")
    assert [t["token"] for t in out["content"][1]["top_logprobs"]] == ["lo", "X"]
    assert chat_logprobs(FakeTok(), META, 0)["content"][0]["top_logprobs"] == []


def test_completion_logprobs_shape():
    out = completion_logprobs(FakeTok(), META, 1)
    assert out["tokens"] == ["Hel", "lo"] and out["token_logprobs"] == [-0.1, -0.2]
    assert out["text_offset"] == [0, 3] and out["top_logprobs"] == [{"Hel": -0.1}, {"lo": -0.2}]


def test_fields_sglang_router_forwards_are_accepted_at_their_defaults_only():
    """Regression (issue 23's benchmark): sglang-router 0.3.2 adds separate_reasoning,
    stream_reasoning and return_hidden_states to every chat request it forwards, and the
    engine answered 400 "unknown parameter(s)"."""
    chat(separate_reasoning=True, stream_reasoning=True, return_hidden_states=False)
    with pytest.raises(InvalidParam, match="return_hidden_states"):
        chat(return_hidden_states=True)
