"""Issue #20 item 3: generated hostile input. schemathesis draws request bodies (valid ones and
broken ones) from an OpenAPI document of the main routes and posts them to a real engine
server on the default model, and to the router in front of fake workers: no 5xx, no hang,
every 4xx carries a message, and the server still answers a plain request afterwards.

The servers serve no OpenAPI document (the routes read raw JSON), so the document is built
here: the OpenAI routes' pydantic models, ``GenerateReqInput``'s fields, and small shapes for
the rest. Generation lengths are capped in the document (the fuzz is about input, not long
outputs); each app gets ``BUDGET_S`` seconds.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import httpx
import pytest
from router_harness import RouterThread, start_fake_workers
from server_process import SERVER_ARGS, default_model_dir, free_port, server_process

from radixfleet.engine.server.openai_protocol import ChatRequest, CompletionRequest
from radixfleet.router.config import RouterConfig

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

BUDGET_S = 80.0  # per app
REQUEST_TIMEOUT_S = 60.0
NULL = {"type": "null"}
TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 60000}, "maxItems": 64}
# Generation lengths: a few tokens (null would mean "up to the context", which is slow, not hostile).
SMALL = {"type": "integer", "minimum": -1, "maximum": 4}


def maybe(schema: dict) -> dict:
    return {"anyOf": [schema, NULL]}


SAMPLING = {"type": "object", "additionalProperties": False, "properties": {
    "max_new_tokens": SMALL, "min_new_tokens": SMALL,
    "temperature": {"type": "number"}, "top_p": {"type": "number"}, "top_k": {"type": "integer"},
    "min_p": {"type": "number"}, "frequency_penalty": {"type": "number"},
    "presence_penalty": {"type": "number"}, "repetition_penalty": {"type": "number"},
    "stop": maybe({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}),
    "stop_token_ids": maybe(TOKEN_IDS), "ignore_eos": {"type": "boolean"},
    "skip_special_tokens": {"type": "boolean"}, "no_stop_trim": {"type": "boolean"},
    "n": {"type": "integer", "minimum": -1, "maximum": 2}, "seed": maybe({"type": "integer"}),
    "json_schema": maybe({"type": "string"}), "regex": maybe({"type": "string", "maxLength": 20}),
    "logit_bias": maybe({"type": "object", "additionalProperties": {"type": "number"}}),
}}
GENERATE = {"type": "object", "additionalProperties": False, "properties": {
    "text": maybe({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 3}]}),
    "input_ids": maybe({"anyOf": [TOKEN_IDS, {"type": "array", "items": TOKEN_IDS, "maxItems": 3}]}),
    "sampling_params": maybe({"anyOf": [SAMPLING, {"type": "array", "items": SAMPLING, "maxItems": 3}]}),
    "rid": maybe({"type": "string"}), "stream": {"type": "boolean"}, "return_logprob": {"type": "boolean"},
    "logprob_start_len": {"type": "integer"}, "top_logprobs_num": {"type": "integer", "maximum": 5},
    "token_ids_logprob": maybe(TOKEN_IDS), "lora_path": maybe({"type": "string"}),
    "custom_logit_processor": maybe({"type": "string"}), "session_params": maybe({"type": "object"}),
}}
ENCODE = {"type": "object", "properties": {"text": {"type": "string"}, "input_ids": TOKEN_IDS}}
EMBEDDINGS = {"type": "object", "properties": {
    "input": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, TOKEN_IDS]},
    "model": {"type": "string"}, "encoding_format": {"type": "string"}}}
SCORE = {"type": "object", "additionalProperties": False, "properties": {
    "query": {"anyOf": [{"type": "string"}, TOKEN_IDS]},
    "items": {"anyOf": [{"type": "array", "items": {"type": "string"}, "maxItems": 3},
                        {"type": "array", "items": TOKEN_IDS, "maxItems": 3}]},
    "label_token_ids": TOKEN_IDS, "apply_softmax": {"type": "boolean"}, "item_first": {"type": "boolean"},
    "model": {"type": "string"}}}
ABORT = {"type": "object", "properties": {"rid": {"type": "string"}, "abort_all": {"type": "boolean"}}}


def openai_schema(model: type, schemas: dict, caps: dict[str, dict]) -> dict:
    """The pydantic model's JSON schema, definitions moved to ``components``, no extra fields,
    and ``caps`` merged into the named properties."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(schema.pop("$defs", {}))
    schema["additionalProperties"] = False
    schema["properties"].update(caps)
    return schema


def openapi_document() -> dict:
    schemas: dict[str, Any] = {}
    n_cap = {"n": {"type": "integer", "minimum": -1, "maximum": 2}}
    message = {"type": "object", "required": ["role", "content"], "additionalProperties": False, "properties": {
        "role": {"enum": ["system", "user", "assistant", "tool"]}, "content": {"type": "string", "maxLength": 200}}}
    chat = openai_schema(ChatRequest, schemas, {"max_tokens": SMALL, "max_completion_tokens": SMALL, **n_cap})
    chat["properties"]["messages"] = {"type": "array", "items": message, "minItems": 1, "maxItems": 4}
    bodies = {
        "/generate": GENERATE,
        "/v1/completions": openai_schema(CompletionRequest, schemas, {"max_tokens": SMALL, **n_cap}),
        "/v1/chat/completions": chat,
        "/v1/embeddings": EMBEDDINGS, "/encode": ENCODE, "/v1/score": SCORE, "/abort_request": ABORT,
        "/flush_cache": {"type": "object", "maxProperties": 0},
    }
    paths = {path: {"post": {
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": {"200": {"description": "ok"}, "400": {"description": "refused"}}}}
        for path, body in bodies.items()}
    return {"openapi": "3.1.0", "info": {"title": "radixfleet", "version": "0"}, "paths": paths,
            "components": {"schemas": schemas}}


def check_answer(resp: httpx.Response, path: str, body: Any) -> None:
    where = f"POST {path} {raw_body(body)[:500]!r}"
    assert resp.status_code < 500, f"{where} -> {resp.status_code} {resp.text[:500]}"
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = None
        assert isinstance(message, str) and message, f"{where} -> {resp.status_code} without a message: {resp.text[:500]}"


def raw_body(body: Any) -> bytes:
    """A drawn body as sent: JSON, or the raw bytes of a broken one (none when absent)."""
    if isinstance(body, bytes):
        return body
    try:
        return json.dumps(body).encode()
    except TypeError:  # schemathesis' "no body" marker
        return b""


def fuzz(base: str, budget_s: float) -> dict[str, int]:
    """Post generated bodies to every route for ``budget_s`` seconds in all; the count per status."""
    schema = schemathesis.openapi.from_dict(openapi_document())
    operations = [schema[path]["POST"] for path in openapi_document()["paths"]]
    statuses: dict[str, int] = {}
    deadline = time.monotonic() + budget_s
    with httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT_S, trust_env=False) as client:
        for i, op in enumerate(operations):
            stop_at = time.monotonic() + (deadline - time.monotonic()) / (len(operations) - i)
            fuzz_operation(client, op, stop_at, statuses)
    return statuses


def fuzz_operation(client: httpx.Client, op: Any, stop_at: float, statuses: dict[str, int]) -> None:
    from hypothesis import HealthCheck, Phase, given, settings

    modes = schemathesis.GenerationMode

    @settings(max_examples=400, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), derandomize=True)
    @given(case=op.as_strategy(generation_mode=modes.POSITIVE) | op.as_strategy(generation_mode=modes.NEGATIVE))
    def post(case: Any) -> None:
        if time.monotonic() > stop_at:
            return
        try:
            resp = client.post(case.path, content=raw_body(case.body), headers={"content-type": "application/json"})
        except httpx.TimeoutException:
            raise AssertionError(f"no answer within {REQUEST_TIMEOUT_S:.0f} s: POST {case.path} "
                                 f"{raw_body(case.body)[:500]!r}") from None
        key = f"{case.path} {resp.status_code}"
        statuses[key] = statuses.get(key, 0) + 1
        check_answer(resp, case.path, case.body)

    post()


def plain_request_works(base: str) -> None:
    out = httpx.post(base + "/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 2}},
                     timeout=60, trust_env=False)
    assert out.status_code == 200, out.text


def test_fuzz_the_engine_server():
    port = free_port()
    cmd = [sys.executable, "-m", "radixfleet.engine.server.serve", "--model-path", default_model_dir(),
           "--port", str(port), *SERVER_ARGS, "--context-length", "256"]  # a chat without max_tokens stays short
    env = {**os.environ, "RADIXFLEET_GRAMMAR_COMPILE_TIMEOUT": "5"}
    with server_process(cmd, port, env=env) as url:
        statuses = fuzz(url, BUDGET_S)
        plain_request_works(url)
    print(json.dumps(statuses, sort_keys=True))
    assert sum(statuses.values()) > 50
    assert any(k.endswith(" 200") for k in statuses) and any(k.endswith(" 400") for k in statuses)


def test_fuzz_the_router_over_fake_workers():
    workers = start_fake_workers(2)
    try:
        config = RouterConfig(port=free_port(), worker_urls=tuple(w.url for w in workers), worker_startup_timeout=5.0)
        with RouterThread(config) as router:
            for _ in range(100):
                if len(httpx.get(router.url + "/list_workers", trust_env=False).json()["urls"]) == 2:
                    break
                time.sleep(0.05)
            statuses = fuzz(router.url, BUDGET_S / 4)
            plain_request_works(router.url)
    finally:
        for w in workers:
            w.kill()
    print(json.dumps(statuses, sort_keys=True))
    assert sum(statuses.values()) > 50


def test_fuzz_finding_a_route_the_worker_lacks_is_a_404_with_a_message():
    """Found by the router fuzz in CI: ``POST /encode {}`` through the router to a worker
    without that route came back as a bare ``{"detail": "Not Found"}``. The engine answers an
    OpenAI-shaped error naming the route; the fake worker now does too, and the router passes
    the worker's error on unchanged."""
    workers = start_fake_workers(1)
    try:
        config = RouterConfig(port=free_port(), worker_urls=(workers[0].url,), worker_startup_timeout=5.0)
        with RouterThread(config) as router:
            resp = httpx.post(router.url + "/encode", json={}, timeout=30, trust_env=False)
    finally:
        workers[0].kill()
    assert resp.status_code == 404
    assert resp.json()["error"]["message"] == "no route POST /encode"
