"""Issue #20 item 3, hand-written hostile input against a real engine server (default model):
each case is refused alone with a 4xx that says why, and the server keeps serving a normal
request right after (or during) it. Each test is named after what it found or checks."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

import httpx
import psutil
import pytest
from server_process import SERVER_ARGS, default_model_dir, free_port, server_process

from radixfleet import Engine
from radixfleet.engine.sampling.grammar import MAX_JSON_SCHEMA_DEPTH
from radixfleet.engine.sampling.params import MAX_N, MAX_STOP_STRS

GENERATION_ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions", "/v1/score", "/encode",
                     "/v1/embeddings", "/abort_request", "/open_session", "/load_lora_adapter")
GRAMMAR_TIMEOUT_S = 3


@pytest.fixture(scope="module")
def url():
    port = free_port()
    cmd = [sys.executable, "-m", "radixfleet.engine.server.serve", "--model-path", default_model_dir(),
           "--port", str(port), *SERVER_ARGS]
    env = {**os.environ, "RADIXFLEET_GRAMMAR_COMPILE_TIMEOUT": str(GRAMMAR_TIMEOUT_S)}
    with server_process(cmd, port, env=env) as u:
        yield u


def still_serves(url: str) -> None:
    out = httpx.post(url + "/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 2}}, timeout=60)
    assert out.status_code == 200 and out.json()["meta_info"]["completion_tokens"] == 2, out.text


def refused(resp: httpx.Response, status: int, words: str) -> None:
    assert resp.status_code == status, resp.text
    assert words in resp.json()["error"]["message"], resp.text


@pytest.mark.parametrize("route", GENERATION_ROUTES)
def test_invalid_utf8_and_invalid_json_bodies_are_400(url, route):
    for body in (b'{"text": "\xff\xfe"}', b'{"text": ', b"\x00\x01", b"[1, 2", b'"just a string"'):
        resp = httpx.post(url + route, content=body, headers={"content-type": "application/json"}, timeout=30)
        assert 400 <= resp.status_code < 500, (route, body, resp.text)
        assert resp.json()["error"]["message"], (route, body, resp.text)
    still_serves(url)


def test_huge_max_new_tokens_is_refused_by_the_context_length(url):
    huge = 10**12
    refused(httpx.post(url + "/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": huge}},
                       timeout=30), 400, "exceed the model's context length")
    refused(httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": huge}, timeout=30),
            400, "exceed the model's context length")
    chat = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": huge, "stop": ["."],
        "temperature": 0, "logit_bias": {}})
    assert chat.status_code == 200, chat.text  # chat cuts max_tokens to the room left (as before)
    still_serves(url)


def test_n_beyond_the_limit_is_400(url):
    refused(httpx.post(url + "/generate", json={"text": "Hi", "sampling_params": {"n": MAX_N + 1}}, timeout=30),
            400, f"n must be in [1, {MAX_N}]")
    resp = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "n": MAX_N + 1}, timeout=30)
    assert resp.status_code == 400 and "n" in resp.json()["error"]["message"], resp.text
    still_serves(url)


def test_a_stop_list_of_10000_strings_is_400_and_the_limit_is_cheap(url):
    many = [f"stop{i}" for i in range(10_000)]
    for route, body in (("/generate", {"text": "Hi", "sampling_params": {"stop": many}}),
                        ("/v1/completions", {"prompt": "Hi", "stop": many}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stop": many})):
        refused(httpx.post(url + route, json=body, timeout=30), 400, f"at most {MAX_STOP_STRS} strings")
    refused(httpx.post(url + "/generate", json={"text": "Hi", "sampling_params": {"stop": ["x" * 10_000]}},
                       timeout=30), 400, "characters each")
    start = time.monotonic()
    ok = httpx.post(url + "/generate", timeout=60, json={"text": "Hi", "sampling_params": {
        "stop": [f"zq{i}" for i in range(MAX_STOP_STRS)], "max_new_tokens": 16, "ignore_eos": True}})
    assert ok.status_code == 200 and ok.json()["meta_info"]["completion_tokens"] == 16, ok.text
    assert time.monotonic() - start < 20


def test_prompts_past_the_context_are_a_clear_400(url):
    long = "hello " * 9000
    refused(httpx.post(url + "/generate", json={"text": long}, timeout=60), 400, "context length")
    refused(httpx.post(url + "/v1/completions", json={"prompt": long}, timeout=60), 400, "context length")
    still_serves(url)


def test_allow_auto_truncate_keeps_the_start_of_a_long_prompt(model_dir):
    with Engine(model_path=model_dir, context_length=64, max_total_tokens=1024,
                allow_auto_truncate=True) as engine:
        ids = list(range(1000, 1100))
        out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 500, "temperature": 0})
        assert out["meta_info"]["prompt_tokens"] == 63
        assert out["meta_info"]["completion_tokens"] == 1  # max_new_tokens cut to the room left
        same = engine.generate(input_ids=ids[:63], sampling_params={"max_new_tokens": 1, "temperature": 0})
        assert out["output_ids"] == same["output_ids"]


def nested_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def test_deep_or_unsatisfiable_or_slow_json_schemas_fail_alone(url):
    deep = json.dumps(nested_schema(MAX_JSON_SCHEMA_DEPTH))
    refused(httpx.post(url + "/generate", json={"text": "Hi", "sampling_params": {"json_schema": deep}},
                       timeout=30), 400, f"at most {MAX_JSON_SCHEMA_DEPTH}")
    very_deep = "[" * 100_000 + "]" * 100_000
    refused(httpx.post(url + "/generate", json={"text": "Hi", "sampling_params": {"json_schema": very_deep}},
                       timeout=30), 400, "json_schema")
    unsat = json.dumps({"type": "integer", "minimum": 5, "maximum": 1})
    refused(httpx.post(url + "/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "Hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": json.loads(unsat)}}}),
        400, "invalid json_schema")
    # ~10 s to compile on one core: the request fails after GRAMMAR_TIMEOUT_S; others go on.
    slow = json.dumps({"type": "object", "required": [f"k{i}" for i in range(600)], "properties": {
        f"k{i}": {"type": "string", "pattern": "[a-z]{1,20}"} for i in range(600)}})
    result: dict = {}
    start = time.monotonic()
    worker = threading.Thread(target=lambda: result.update(resp=httpx.post(
        url + "/generate", json={"text": "Hi", "sampling_params": {"json_schema": slow}}, timeout=60)))
    worker.start()
    still_serves(url)
    small = json.dumps({"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]})
    later = httpx.post(url + "/generate", timeout=60, json={"text": "Hi", "sampling_params": {
        "json_schema": small, "max_new_tokens": 16, "temperature": 0}})
    worker.join()
    refused(result["resp"], 400, f"did not compile within {GRAMMAR_TIMEOUT_S} s")
    assert time.monotonic() - start < GRAMMAR_TIMEOUT_S + 20
    assert later.status_code == 200, later.text  # queued behind the slow one, compiled anyway
    still_serves(url)


def test_1000_connections_that_never_read_their_stream(url):
    """Raw sockets send a streaming request each and never read: the server keeps answering a
    normal client, and its memory stays bounded."""
    server = next(p for p in psutil.Process().children(recursive=True)
                  if f"{url.rsplit(':', 1)[1]}" in " ".join(p.cmdline()))
    rss_before = server.memory_info().rss
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"text": "Tell me a story", "stream": True,
                       "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}}).encode()
    request = (f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    socks = []
    try:
        for _ in range(1000):
            s = socket.create_connection((host, int(port)), timeout=10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(request)
            socks.append(s)
        start = time.monotonic()
        still_serves(url)
        assert time.monotonic() - start < 120
        grown = server.memory_info().rss - rss_before
        assert grown < 512 << 20, f"the server grew by {grown >> 20} MiB"
    finally:
        for s in socks:
            s.close()
    still_serves(url)


def test_top_logprobs_num_out_of_range_is_400_not_a_dead_engine(url):
    """Found by the fuzz (test_fuzz_openapi): a negative top_logprobs_num reached torch.topk in
    the scheduler and the engine process exited (every later request: 503)."""
    for bad in (-3, 10**20, 2.5, "3"):
        resp = httpx.post(url + "/generate", timeout=30, json={"text": "Hi", "return_logprob": True,
                                                               "top_logprobs_num": bad})
        refused(resp, 400, "top_logprobs_num")
    still_serves(url)


def test_echo_of_out_of_vocabulary_token_ids_is_400_not_500(url):
    """Found by the fuzz: /v1/completions with echo decoded the ids before they were checked
    (OverflowError, a 500)."""
    for ids in ([-(10**24), 5], [10**6]):
        resp = httpx.post(url + "/v1/completions", json={"prompt": ids, "echo": True, "max_tokens": 1}, timeout=30)
        refused(resp, 400, "prompt token ids")
    still_serves(url)


def test_custom_logit_processors_are_refused_unless_enabled(url):
    """Issue #20 item 4: a processor is client code the server would deserialise and run."""
    resp = httpx.post(url + "/generate", timeout=30, json={"text": "Hi", "custom_logit_processor": '{"callable": "x"}'})
    refused(resp, 400, "custom_logit_processor is disabled")
    still_serves(url)
