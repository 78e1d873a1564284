"""``GenerateReqInput``, the one generate request type (issue #16): its normalisation gives
a batch's prompts the same single requests as one call per prompt, and the native
``/generate`` route takes exactly its fields (no model: a fake TokenizerManager)."""

from __future__ import annotations

from dataclasses import fields
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from radixfleet.engine.managers.io_struct import GenerateOptions, GenerateReqInput
from radixfleet.engine.server.common import ServerState
from radixfleet.engine.server.http_server import build_app

PROCESSOR = '{"callable": "x"}'

# A value other than the default for every field (input_ids: see the route test).
SAMPLES = {
    "text": "Hello", "input_ids": [5, 6], "sampling_params": {"max_new_tokens": 3, "temperature": 0},
    "rid": "req-1", "stream": True, "session_params": {"id": "s"}, "return_logprob": True,
    "logprob_start_len": 1, "top_logprobs_num": 2, "return_hidden_states": True,
    "return_text_in_logprobs": True, "custom_logit_processor": PROCESSOR, "token_ids_logprob": [1, 2],
    "lora_path": "adapter",
}


def _comparable(reqs):
    return [(r.rid, r.text, r.input_ids, r.params, r.stream, r.options, r.session_params) for r in reqs]


@pytest.mark.parametrize("inputs", [{"text": ["a", "b", "c"]}, {"input_ids": [[1], [2, 3], [4]]}])
def test_a_batch_normalises_to_the_requests_of_one_call_per_prompt(inputs):
    (key, prompts), = inputs.items()
    per_prompt = {"rid": ["r0", "r1", "r2"], "return_logprob": [True, True, False],
                  "custom_logit_processor": [PROCESSOR, None, None], "lora_path": ["a", None, "b"],
                  "sampling_params": [{"max_new_tokens": 1}, {"temperature": 0}, {"n": 1}]}
    shared = {"logprob_start_len": 0, "top_logprobs_num": 3, "return_hidden_states": True,
              "return_text_in_logprobs": True, "stream": True}
    batch, is_batch = GenerateReqInput(**{key: prompts}, **per_prompt, **shared).normalize()
    assert is_batch and len(batch) == 3
    singles = []
    for i, prompt in enumerate(prompts):
        reqs, single_is_batch = GenerateReqInput(**{key: prompt}, **{k: v[i] for k, v in per_prompt.items()},
                                                 **shared).normalize()
        assert not single_is_batch
        singles += reqs
    assert _comparable(batch) == _comparable(singles)
    assert batch[0].options == GenerateOptions(return_logprob=True, logprob_start_len=0, top_logprobs_num=3,
                                               return_hidden_states=True, return_text_in_logprobs=True,
                                               custom_logit_processor=PROCESSOR, lora_path="a")


def test_shared_token_ids_logprob_goes_to_every_prompt():
    reqs, _ = GenerateReqInput(text=["a", "b"], return_logprob=True, token_ids_logprob=[7, 8]).normalize()
    assert [r.options.token_ids_logprob for r in reqs] == [[7, 8], [7, 8]]
    reqs, _ = GenerateReqInput(text=["a", "b"], return_logprob=True, token_ids_logprob=[[7], [8]]).normalize()
    assert [r.options.token_ids_logprob for r in reqs] == [[7], [8]]


@pytest.mark.parametrize("kwargs, message", [
    ({}, "pass a prompt or input_ids"),
    ({"text": "a", "input_ids": [1]}, "either prompt or input_ids"),
    ({"text": ["a", ""]}, "the prompt is empty"),
    ({"text": []}, "the prompt list is empty"),
    ({"input_ids": [[1], []]}, "input_ids is empty"),
    ({"text": ["a", "b"], "sampling_params": [{}]}, "got 1 sampling_params for 2 prompts"),
    ({"text": ["a", "b"], "rid": "x"}, "got 1 rids for 2 prompts"),
    ({"text": ["a", "b"], "custom_logit_processor": [None]}, "got 1 custom_logit_processor entries"),
    ({"text": "a", "token_ids_logprob": [1]}, "token_ids_logprob needs return_logprob=True"),
    ({"text": "a", "return_logprob": True, "token_ids_logprob": []}, "token_ids_logprob must be"),
    ({"text": ["a", "b"], "lora_path": ["a"]}, "lora_path must be an adapter name"),
    ({"text": ["a", "b"], "session_params": {"id": "s"}}, "session_params continue one request"),
    ({"text": "a", "sampling_params": {"bogus": 1}}, "unknown sampling parameter"),
])
def test_bad_calls_raise_value_error_naming_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerateReqInput(**kwargs).normalize()


def test_unknown_arguments_are_named():
    with pytest.raises(ValueError, match=r"unsupported generate argument\(s\): bogus, text"):
        GenerateReqInput.from_kwargs({"bogus": 1, "text": "a"}, text="b")


class FakeTokenizerManager:
    """Records the requests the routes submit and finishes each with one token."""

    model_name, tokenizer, is_embedding, context_length = "m", None, False, 128

    def __init__(self) -> None:
        self.listeners: list = []
        self.seen: list = []

    async def stream_async(self, reqs):
        self.seen += reqs
        for i, r in enumerate(reqs):
            yield i, {"text": "x", "output_ids": [1], "meta_info": {
                "id": r.rid, "finish_reason": {"type": "length", "length": 1}, "prompt_tokens": 1,
                "completion_tokens": 1, "cached_tokens": 0}}


@pytest.fixture
def served():
    tm = FakeTokenizerManager()
    state = ServerState(SimpleNamespace(tokenizer_manager=tm))
    with TestClient(build_app(state)) as client:
        yield client, tm


def test_the_native_route_takes_every_field_and_only_those(served):
    client, tm = served
    assert set(SAMPLES) == GenerateReqInput.field_names()  # a new field needs a sample here
    body = {k: v for k, v in SAMPLES.items() if k != "input_ids"}
    resp = client.post("/generate", json=body)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    (req,) = tm.seen
    assert (req.rid, req.text, req.session_params) == ("req-1", "Hello", {"id": "s"})
    assert req.params.max_new_tokens == 3
    assert req.options == GenerateOptions(**{f.name: SAMPLES[f.name] for f in fields(GenerateOptions)})

    resp = client.post("/generate", json={"input_ids": SAMPLES["input_ids"]})
    assert resp.status_code == 200, resp.text
    assert tm.seen[-1].input_ids == [5, 6]

    resp = client.post("/generate", json={**body, "nonsense": 1, "zzz": 2})
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["message"] == "unsupported generate argument(s): nonsense, zzz" and err["param"] == "nonsense"
