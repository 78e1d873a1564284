"""SGLang's native routes on a live server (default model, CPU): /generate (single, batch,
input_ids, SSE), info and control routes, error objects, body limit, and a client that
disconnects mid-generation freeing its KV slots."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from server_process import default_model_dir, engine_server

GREEDY = {"temperature": 0, "max_new_tokens": 16}
LONG = {"temperature": 0, "max_new_tokens": 3000, "ignore_eos": True}


# A custom --chat-template (the model's own ChatML template is the default).
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "plain.jinja"
    template.write_text(CHAT_TEMPLATE)
    with engine_server(default_model_dir(), "--max-request-bytes", "65536", "--chat-template", str(template)) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=120) as c:
        yield c


def sse_events(lines) -> list:
    """Parse ``data:`` lines; the final ``[DONE]`` is returned as the string itself."""
    events = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def internal_state(client) -> dict:
    return client.get("/get_server_info").json()["internal_states"][0]


def wait_idle(client, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = internal_state(client)
        if state["num_running_requests"] == 0 and state["num_queued_requests"] == 0:
            return state
        assert time.monotonic() < deadline, f"requests still running: {state}"
        time.sleep(0.1)


def test_generate_text_and_input_ids_agree(client):
    out = client.post("/generate", json={"text": "The capital of France is", "sampling_params": GREEDY})
    assert out.status_code == 200, out.text
    body = out.json()
    assert body["text"].startswith(" Paris")
    meta = body["meta_info"]
    assert meta["completion_tokens"] == len(body["output_ids"]) and meta["prompt_tokens"] == 5
    assert meta["finish_reason"]["type"] in ("stop", "length")
    ids = client.post("/generate", json={"input_ids": [504, 3575, 282, 4649, 314], "sampling_params": GREEDY})
    # "The capital of France is" tokenizes to those ids.
    assert ids.json()["output_ids"] == body["output_ids"]


def test_batch_returns_a_list_in_order(client):
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    batch = client.post("/generate", json={"text": prompts, "sampling_params": GREEDY}).json()
    assert isinstance(batch, list) and len(batch) == 3
    for prompt, out in zip(prompts, batch):
        alone = client.post("/generate", json={"text": prompt, "sampling_params": GREEDY}).json()
        assert out["output_ids"] == alone["output_ids"]


def test_stream_concatenates_to_the_non_streaming_answer(client):
    req = {"text": "Once upon a time, in a land far away,", "sampling_params": {**GREEDY, "max_new_tokens": 24}}
    whole = client.post("/generate", json=req).json()
    with client.stream("POST", "/generate", json={**req, "stream": True}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp.iter_lines())
    assert events[-1] == "[DONE]" and all(isinstance(e, dict) for e in events[:-1])
    chunks = events[:-1]
    assert len(chunks) > 1
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert sum((c["output_ids"] for c in chunks), []) == whole["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"] == whole["meta_info"]["finish_reason"]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])


def test_batch_stream_chunks_carry_their_index(client):
    req = {"text": ["Hello", "The weather today is"], "sampling_params": {**GREEDY, "max_new_tokens": 4},
           "stream": True}
    with client.stream("POST", "/generate", json=req) as resp:
        events = sse_events(resp.iter_lines())
    assert events[-1] == "[DONE]"
    assert {e["index"] for e in events[:-1]} == {0, 1}


def test_info_routes(client):
    info = client.get("/get_model_info").json()
    assert set(info) == {"model_path", "tokenizer_path", "is_generation"} and info["is_generation"] is True
    server = client.get("/get_server_info").json()
    assert server["max_total_tokens"] == 8192
    assert server["context_length"] > 0 and server["schedule_policy"] == "lpm"
    state = server["internal_states"][0]
    assert {"num_running_requests", "num_queued_requests", "kv_used_tokens", "kv_cache_usage_ratio"} <= set(state)
    assert client.get("/health").status_code == 200
    assert client.get("/health_generate").status_code == 200


def test_flush_cache_then_prompt_is_not_cached(client):
    wait_idle(client)
    assert client.post("/flush_cache").json()["success"] is True
    out = client.post("/generate", json={"text": "List three colors:", "sampling_params": GREEDY}).json()
    assert out["meta_info"]["cached_tokens"] == 0


@pytest.mark.parametrize("body, needle", [
    ({"text": "", "sampling_params": GREEDY}, "empty"),
    ({"text": "hi", "sampling_params": {"temperature": -1}}, "temperature"),
    ({"text": "hi", "sampling_params": {"bogus": 1}}, "bogus"),
    ({"text": "hi", "input_ids": [1]}, "either"),
    ({"input_ids": [10**9]}, "vocabulary"),
    ({"text": "hi", "nonsense": True}, "nonsense"),
])
def test_bad_input_is_a_400_with_the_reason_and_the_server_keeps_serving(client, body, needle):
    resp = client.post("/generate", json=body)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"
    assert client.post("/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 1}}).status_code == 200


def test_errors_carry_a_reason(client):
    resp = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "JSON" in resp.json()["error"]["message"]
    resp = client.get("/no/such/route")
    assert resp.status_code == 404 and "/no/such/route" in resp.json()["error"]["message"]
    resp = client.get("/generate")
    assert resp.status_code == 405 and resp.json()["error"]["message"]
    resp = client.post("/generate", json={"text": "x" * 70000})
    assert resp.status_code == 413 and "65536" in resp.json()["error"]["message"]


def test_abort_request_ends_a_running_stream(client):
    wait_idle(client)
    req = {"text": "Count to one thousand:", "sampling_params": LONG, "stream": True, "rid": "to-abort"}
    with client.stream("POST", "/generate", json=req) as resp:
        lines = resp.iter_lines()
        first = next(line for line in lines if line)
        assert json.loads(first[len("data: "):])["meta_info"]["finish_reason"] is None
        assert client.post("/abort_request", json={"rid": "to-abort"}).json()["success"] is True
        events = sse_events(lines)
    assert events[-1] == "[DONE]"
    assert events[-2]["meta_info"]["finish_reason"]["type"] == "abort"
    assert client.post("/abort_request", json={}).status_code == 400


def test_stream_client_disconnect_frees_its_kv_slots(client, url):
    before = wait_idle(client)
    with httpx.Client(base_url=url, timeout=60) as other:
        req = {"text": "Write a very long story about a dragon.", "sampling_params": LONG, "stream": True}
        with other.stream("POST", "/generate", json=req) as resp:
            got, last = 0, ""
            lines = resp.iter_lines()
            for line in lines:
                got += bool(line)
                last = line or last
                if got == 20:
                    break
            during = internal_state(client)
            if during["num_running_requests"] != 1:  # diagnose: how did the stream go on?
                rest = [line for line in lines if line][-3:]
                pytest.fail(json.dumps([got, last, during, rest, internal_state(client)]))
            assert during["kv_used_tokens"] > before["kv_used_tokens"]
        # leaving the block closes the connection mid-stream
    after = wait_idle(client, timeout=10)
    # The request's own slots are freed; what stays is at most its prompt and output in the radix cache,
    # which is evictable (not counted as used).
    assert after["kv_used_tokens"] == before["kv_used_tokens"], (before, after)
    assert after["generated_tokens"] - before["generated_tokens"] < 200  # stopped, not run to 3000


def test_non_streaming_client_disconnect_aborts_the_request(client, url):
    before = wait_idle(client)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/generate", json={"text": "Tell me everything.", "sampling_params": LONG}, timeout=2.0)
    after = wait_idle(client, timeout=10)
    assert after["kv_used_tokens"] == before["kv_used_tokens"], (before, after)
    assert after["generated_tokens"] - before["generated_tokens"] < 300


def test_chat_template_flag_replaces_the_tokenizer_template(client):
    chat = client.post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "What is 2 + 2?"}], "temperature": 0,
        "max_tokens": 8}).json()
    native = client.post("/generate", json={"text": "user: What is 2 + 2?\nassistant:",
                                            "sampling_params": {"temperature": 0, "max_new_tokens": 8}}).json()
    assert chat["choices"][0]["message"]["content"] == native["text"]
    assert chat["usage"]["prompt_tokens"] == native["meta_info"]["prompt_tokens"]
