"""``Engine.score`` / ``/v1/score`` and ``generate(token_ids_logprob=...)`` on the default model
(CPU), against HF transformers' next-token distribution on the same weights."""

from __future__ import annotations

import asyncio
import math

import httpx
import pytest
import torch
from helpers import _hf_model
from server_process import engine_server

from radixfleet import Engine

QUERY = "Is the following city the capital of France? Answer Yes or No.\nCity:"
ITEMS = [" Paris", " London", " Berlin, Germany"]


@pytest.fixture(scope="module")
def engine(model_dir):
    with Engine(model_path=model_dir, max_total_tokens=8192, random_seed=0) as e:
        yield e


@pytest.fixture(scope="module")
def hf(model_dir):
    model, tok = _hf_model(model_dir)

    def next_logprobs(ids: list[int]) -> torch.Tensor:
        """HF's log-softmax at every position of ``ids`` [T, V]."""
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)

    return next_logprobs, tok


@pytest.fixture(scope="module")
def labels(hf):
    _, tok = hf
    return [tok.encode(" Yes")[0], tok.encode(" No")[0], tok.encode(" yes")[0]]


def test_scores_are_hf_label_probabilities(engine, hf, labels):
    next_logprobs, tok = hf
    result = engine.score(QUERY, ITEMS, labels)
    assert len(result.scores) == len(ITEMS) and all(len(s) == len(labels) for s in result.scores)
    total = 0
    for item, got in zip(ITEMS, result.scores, strict=True):
        ids = tok.encode(QUERY + item)
        total += len(ids)
        want = next_logprobs(ids)[-1, labels].exp()
        assert torch.allclose(torch.tensor(got, dtype=torch.float32), want, rtol=1e-3, atol=1e-6), (item, got, want)
    assert result.prompt_tokens == total


def test_apply_softmax_renormalises_over_the_labels(engine, hf, labels):
    next_logprobs, tok = hf
    result = engine.score(QUERY, ITEMS, labels, apply_softmax=True)
    for item, got in zip(ITEMS, result.scores, strict=True):
        assert math.isclose(sum(got), 1.0, abs_tol=1e-6)
        want = torch.softmax(next_logprobs(tok.encode(QUERY + item))[-1, labels], -1)
        assert torch.allclose(torch.tensor(got, dtype=torch.float32), want, atol=1e-4)


def test_token_id_inputs_and_item_first(engine, hf, labels):
    next_logprobs, tok = hf
    query_ids, item_ids = tok.encode(" is the capital of France."), [tok.encode(" Paris"), tok.encode(" Rome")]
    result = engine.score(query_ids, item_ids, labels, item_first=True)
    for item, got in zip(item_ids, result.scores, strict=True):
        want = next_logprobs(item + query_ids)[-1, labels].exp()
        assert torch.allclose(torch.tensor(got, dtype=torch.float32), want, rtol=1e-3, atol=1e-6)
    again = asyncio.run(engine.async_score(query_ids, item_ids, labels, item_first=True))  # prefix now cached
    assert torch.allclose(torch.tensor(again.scores), torch.tensor(result.scores), rtol=1e-4, atol=1e-7)


def test_token_ids_logprob_on_generate_matches_hf(engine, hf, labels):
    next_logprobs, tok = hf
    prompt = "The capital of France is"
    out = engine.generate(prompt, {"max_new_tokens": 4, "temperature": 0}, return_logprob=True,
                          logprob_start_len=0, token_ids_logprob=labels)
    meta = out["meta_info"]
    ids = tok.encode(prompt) + out["output_ids"]
    ref = next_logprobs(ids)
    n = len(tok.encode(prompt))
    assert len(meta["output_token_ids_logprobs"]) == 4
    for k, entries in enumerate(meta["output_token_ids_logprobs"]):
        assert [t for _, t, _ in entries] == labels
        assert max(abs(v - ref[n - 1 + k, t].item()) for v, t, _ in entries) < 1e-3
    inputs = meta["input_token_ids_logprobs"]
    assert len(inputs) == n and inputs[0] is None  # position 0 has no context
    for i, entries in enumerate(inputs[1:], start=1):
        assert max(abs(v - ref[i - 1, t].item()) for v, t, _ in entries) < 1e-3


@pytest.mark.parametrize("kwargs, message", [
    ({"query": QUERY, "items": ITEMS, "label_token_ids": []}, "label_token_ids"),
    ({"query": QUERY, "items": ITEMS, "label_token_ids": [10**7]}, "outside the vocabulary"),
    ({"query": QUERY, "items": [], "label_token_ids": [5]}, "items must be"),
    ({"query": QUERY, "items": [[1, 2]], "label_token_ids": [5]}, "items must be"),
    ({"query": [1, 2], "items": ["text"], "label_token_ids": [5]}, "items must be"),
    ({"query": None, "items": ITEMS, "label_token_ids": [5]}, "query and items"),
])
def test_bad_score_calls_are_value_errors(engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.score(**kwargs)
    assert engine.score(QUERY, ITEMS[:1], [5]).scores


def test_token_ids_logprob_needs_return_logprob(engine):
    with pytest.raises(ValueError, match="needs return_logprob"):
        engine.generate("Hi", {"max_new_tokens": 1}, token_ids_logprob=[5])


def test_lora_path_needs_enable_lora(engine):
    with pytest.raises(ValueError, match="needs an engine started with enable_lora"):
        engine.generate("Hi", {"max_new_tokens": 1}, lora_path="adapter")


def test_v1_score_route(model_dir, engine, labels):
    with engine_server(model_dir, "--served-model-name", "smol") as url:
        body = {"model": "smol", "query": QUERY, "items": ITEMS, "label_token_ids": labels, "apply_softmax": True}
        resp = httpx.post(url + "/v1/score", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        data = resp.json()
        want = engine.score(QUERY, ITEMS, labels, apply_softmax=True)
        assert data["object"] == "scoring" and data["model"] == "smol"
        assert torch.allclose(torch.tensor(data["scores"]), torch.tensor(want.scores), atol=1e-5)
        assert data["usage"]["prompt_tokens"] == want.prompt_tokens
        for bad, message in [({**body, "label_token_ids": "yes"}, "label_token_ids"),
                             ({**body, "temperature": 1}, "unknown parameter 'temperature'"),
                             ({**body, "items": []}, "items must be")]:
            resp = httpx.post(url + "/v1/score", json=bad, timeout=60)
            assert resp.status_code == 400 and message in resp.json()["error"]["message"], resp.text
        gen = httpx.post(url + "/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 2},
                                                  "return_logprob": True, "token_ids_logprob": labels}, timeout=60)
        assert len(gen.json()["meta_info"]["output_token_ids_logprobs"]) == 2
