"""The official ``openai`` client against a live server on the default model (CPU): chat,
completions, streaming, n=2, logprobs, response_format json_schema, tool calls, errors.
Greedy answers must equal what ``/generate`` (``Engine.generate``'s shape and code path) returns
for the same prompt; ``tests/integration/test_engine_greedy.py`` ties those to HF transformers."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest
from server_process import default_model_dir, engine_server

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
COMPLETION_PROMPT = "The capital of France is"
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
PERSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                  "age": {"type": "integer", "minimum": 0, "maximum": 150}},
                 "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def url():
    with engine_server(default_model_dir()) as u:
        yield u


@pytest.fixture(scope="module")
def references(url):
    """Greedy answers of the native ``/generate`` (the ``Engine.generate`` shape) for the same prompts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    chat_prompt = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)

    def generate(text: str, max_new_tokens: int) -> dict:
        body = {"text": text, "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens}}
        resp = httpx.post(url + "/generate", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        return resp.json()

    return {"chat": generate(chat_prompt, 32), "completion": generate(COMPLETION_PROMPT, 12)}


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    models = client.models.list().data
    assert len(models) == 1
    return models[0].id


def test_models(client, model):
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("no-such-model")


def test_chat_matches_engine_generate(client, model, references):
    ref = references["chat"]
    resp = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=32)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ref["text"] == "The capital of France is Paris."
    assert choice.finish_reason == "stop"
    assert resp.usage.prompt_tokens == ref["meta_info"]["prompt_tokens"]
    assert resp.usage.completion_tokens == ref["meta_info"]["completion_tokens"]
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_completion_matches_engine_generate(client, model, references):
    ref = references["completion"]
    resp = client.completions.create(model=model, prompt=COMPLETION_PROMPT, temperature=0, max_tokens=12)
    assert resp.choices[0].text == ref["text"]
    assert resp.choices[0].finish_reason == ref["meta_info"]["finish_reason"]["type"]
    assert resp.usage.completion_tokens == ref["meta_info"]["completion_tokens"]


def test_chat_stream_concatenates_to_the_answer_with_usage(client, model, references):
    stream = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=32,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == references["chat"]["text"]
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        references["chat"]["meta_info"]["completion_tokens"]


def test_completion_stream_ends_with_done(url, model, references):
    body = {"model": model, "prompt": COMPLETION_PROMPT, "temperature": 0, "max_tokens": 12, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == references["completion"]["text"]


def test_n2_gives_two_choices_and_counts_the_prompt_once(client, model):
    resp = client.chat.completions.create(model=model, messages=QUESTION, n=2, temperature=0.8, seed=7,
                                          max_tokens=8)
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.message.content for c in resp.choices)
    single = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=1)
    assert resp.usage.prompt_tokens == single.usage.prompt_tokens
    assert resp.usage.completion_tokens <= 16


def test_stop_string(client, model):
    resp = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=32,
                                          stop=[" Paris"])
    assert resp.choices[0].message.content == "The capital of France is"
    assert resp.choices[0].finish_reason == "stop"


def test_max_completion_tokens_limits_length(client, model):
    resp = client.chat.completions.create(model=model, messages=QUESTION, temperature=0,
                                          max_completion_tokens=3)
    assert resp.usage.completion_tokens == 3 and resp.choices[0].finish_reason == "length"
    assert resp.choices[0].message.content == "The capital of"


def test_seed_makes_sampling_repeatable(client, model):
    def ask():
        return client.chat.completions.create(model=model, messages=QUESTION, temperature=1.0, seed=1234,
                                              max_tokens=12).choices[0].message.content

    assert ask() == ask()


def test_chat_logprobs(client, model):
    resp = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=8,
                                          logprobs=True, top_logprobs=3)
    choice = resp.choices[0]
    content = choice.logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert "".join(t.token for t in content).startswith(choice.message.content)
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert item.top_logprobs[0].token == item.token
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-4)
        assert item.bytes == list(item.token.encode())


def test_completion_logprobs(client, model):
    resp = client.completions.create(model=model, prompt=COMPLETION_PROMPT, temperature=0, max_tokens=5,
                                     logprobs=2)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == resp.choices[0].text
    assert all(len(t) == 2 for t in lp.top_logprobs)


def test_response_format_json_schema(client, model):
    resp = client.chat.completions.create(
        model=model, temperature=0, max_tokens=64,
        messages=[{"role": "user", "content": "Give me a person as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA}})
    jsonschema.validate(json.loads(resp.choices[0].message.content), PERSON_SCHEMA)


def test_response_format_json_object(client, model):
    args = dict(model=model, temperature=0, max_tokens=24, messages=QUESTION)
    free = client.chat.completions.create(**args).choices[0]
    constrained = client.chat.completions.create(**args, response_format={"type": "json_object"}).choices[0]
    assert not free.message.content.startswith("{")
    text = constrained.message.content
    assert text.lstrip().startswith("{"), text
    if constrained.finish_reason == "stop":  # a small model may ramble until max_tokens
        assert isinstance(json.loads(text), dict)


def test_named_tool_call(client, model):
    resp = client.chat.completions.create(
        model=model, temperature=0, max_tokens=64, tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])


def test_required_tool_call_streamed(client, model):
    stream = client.chat.completions.create(
        model=model, temperature=0, max_tokens=80, tools=[WEATHER_TOOL], tool_choice="required", stream=True,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    chunks = list(stream)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [tc.function.name for tc in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER_TOOL["function"]["parameters"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        ["tool_calls"]


def test_tool_result_round_trip_renders(client, model):
    # An assistant tool call and its result in the history go through the chat template.
    messages = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, sunny"}]
    resp = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER_TOOL],
                                          temperature=0, max_tokens=8)
    assert resp.choices[0].message.content is not None


@pytest.mark.parametrize("kwargs, needle", [
    ({"temperature": -1}, "temperature"),
    ({"extra_body": {"bogus_option": 1}}, "bogus_option"),
    ({"tool_choice": {"type": "function", "function": {"name": "missing"}}, "tools": [WEATHER_TOOL]}, "missing"),
    ({"tool_choice": "required"}, "tools"),
    ({"top_logprobs": 2}, "logprobs"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "image_url"),
])
def test_bad_requests_are_400_error_objects(client, model, kwargs, needle):
    args = {"model": model, "messages": QUESTION, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**args)
    assert needle in err.value.message
    assert err.value.body["type"] == "invalid_request_error"
    # the server keeps serving
    assert client.chat.completions.create(model=model, messages=QUESTION, max_tokens=1).choices


def test_embeddings_on_a_generation_model_are_400(client, model, url):
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=model, input="hi")
    assert "encode needs an embedding model" in err.value.message
    native = httpx.post(url + "/encode", json={"text": "hi"}, timeout=30)
    assert native.status_code == 400 and "embedding model" in native.json()["error"]["message"]
    assert client.chat.completions.create(model=model, messages=QUESTION, max_tokens=1).choices


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_call_is_parsed_from_model_text(client, model, stream):
    # tool_choice "auto": the server's parser (qwen25 for this ChatML model) reads the call out of
    # the text. SGLang's `regex` extension makes the small model write exactly such a call.
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    regex = "Checking\\. " + call.replace("{", "\\{").replace("}", "\\}")
    resp = client.chat.completions.create(
        model=model, temperature=0, max_tokens=160, tools=[WEATHER_TOOL], tool_choice="auto", stream=stream,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}], extra_body={"regex": regex})
    if stream:
        chunks = list(resp)
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        msg = resp.choices[0].message
        content, calls, reason = msg.content, msg.tool_calls, [resp.choices[0].finish_reason]
    assert content.strip() == "Checking."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [("get_weather", {"city": "Paris", "unit": "celsius"})]
    assert reason == ["tool_calls"]


def test_completions_batch_of_prompts_with_n2_orders_choices_prompt_major(client, model):
    prompts = ["The capital of France is", "Water boils at"]
    resp = client.completions.create(model=model, prompt=prompts, n=2, temperature=0, max_tokens=4)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    alone = [client.completions.create(model=model, prompt=p, temperature=0, max_tokens=4).choices[0].text
             for p in prompts]
    assert [c.text for c in resp.choices] == [alone[0], alone[0], alone[1], alone[1]]


def test_chat_stream_disconnect_frees_the_request(url, model):
    def state() -> dict:
        return httpx.get(url + "/get_server_info", timeout=30).json()["internal_states"][0]

    before = state()
    body = {"model": model, "messages": QUESTION, "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as resp:
        lines = (line for line in resp.iter_lines() if line)
        for _ in range(10):
            next(lines)
        assert state()["num_running_requests"] == 1
    for _ in range(100):
        after = state()
        if after["num_running_requests"] == 0:
            break
        time.sleep(0.1)
    assert after["num_running_requests"] == 0 and after["kv_used_tokens"] == before["kv_used_tokens"]
    assert after["generated_tokens"] - before["generated_tokens"] < 300
