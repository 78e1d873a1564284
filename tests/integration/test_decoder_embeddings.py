"""Decoder embedding models (gte-Qwen2 / e5-mistral style) through ``Engine.encode`` and the
HTTP routes, against HF transformers' hidden states (fp32, CPU): last-token pooling and L2
normalisation, instruction prefixes from ``config_sentence_transformers.json``, and
``dimensions`` truncating and renormalising where the config allows it (400 where not).

Two tiny random-weight folders: a ``Qwen2ForCausalLM`` served with ``is_embedding`` (as
gte-Qwen2 ships) with the default model's tokenizer and sentence-transformers files, and a
``MistralModel`` (no LM head, as e5-mistral ships) with an 8-token sliding window.
"""

from __future__ import annotations

import json
import os
import shutil

import httpx
import openai
import pytest
import torch
from helpers import make_tiny_model
from server_process import engine_server

from radixfleet import Engine

QUERY = "Instruct: Given a question, retrieve passages that answer it\nQuery: "
TEXTS = ["What is the capital of France?", "Rust is a systems programming language with a borrow checker.",
         "a"]
_gen = torch.Generator().manual_seed(11)
IDS = [torch.randint(1, 512, (n,), generator=_gen).tolist() for n in (3, 20, 41)]


@pytest.fixture(scope="module")
def gte(tmp_path_factory, model_dir) -> str:
    folder = make_tiny_model("qwen2", str(tmp_path_factory.mktemp("gte")), vocab_size=49152)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(model_dir, name), folder)
    files = {
        "modules.json": [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                         {"idx": 1, "name": "1", "path": "1_Pooling",
                          "type": "sentence_transformers.models.Pooling"},
                         {"idx": 2, "name": "2", "path": "2_Normalize",
                          "type": "sentence_transformers.models.Normalize"}],
        "1_Pooling/config.json": {"word_embedding_dimension": 128, "pooling_mode_lasttoken": True},
        "config_sentence_transformers.json": {"prompts": {"query": QUERY, "document": ""},
                                              "default_prompt_name": None},
    }
    for name, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config["matryoshka_dimensions"] = [32, 64]
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder


@pytest.fixture(scope="module")
def e5(tmp_path_factory) -> str:
    import transformers

    folder = str(tmp_path_factory.mktemp("e5"))
    config = transformers.MistralConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=512, sliding_window=8)
    torch.manual_seed(0)
    model = transformers.MistralModel(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder)
    return folder


def hf_embedding(folder: str, ids: list[int]) -> torch.Tensor:
    """The last token's final hidden state of transformers' base model, L2-normalised."""
    import transformers

    model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(torch.tensor([ids])).last_hidden_state[0, -1]
    return torch.nn.functional.normalize(hidden, dim=-1)


def assert_close(got: list[float], want: torch.Tensor) -> None:
    got_t = torch.tensor(got)
    assert got_t.shape == want.shape
    assert (got_t - want).abs().max().item() < 1e-5
    assert abs(got_t.norm().item() - 1.0) < 1e-5


@pytest.fixture(scope="module")
def gte_engine(gte):
    with Engine(model_path=gte, is_embedding=True) as engine:
        yield engine


def test_last_token_pooling_matches_hf(gte, e5, gte_engine):
    for folder, engine in ((gte, gte_engine), (e5, None)):
        if engine is None:  # MistralModel: an embedding model without is_embedding
            with Engine(model_path=e5, skip_tokenizer_init=True) as e:
                outs = e.encode(input_ids=IDS)
        else:
            outs = engine.encode(input_ids=IDS)
        for ids, out in zip(IDS, outs, strict=True):
            assert_close(out["embedding"], hf_embedding(folder, ids))
            assert out["meta_info"]["prompt_tokens"] == len(ids)


def test_instruction_prefix_from_the_sentence_transformers_config(gte, gte_engine):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gte)
    query = gte_engine.encode(TEXTS[0], prompt_name="query")
    assert_close(query["embedding"], hf_embedding(gte, tok(QUERY + TEXTS[0]).input_ids))
    plain = gte_engine.encode(TEXTS, prompt_name="document")  # "" prefix
    for text, out in zip(TEXTS, plain, strict=True):
        assert_close(out["embedding"], hf_embedding(gte, tok(text).input_ids))
    with pytest.raises(ValueError, match="prompt_name 'passage': this model's prompts are document, query"):
        gte_engine.encode(TEXTS[0], prompt_name="passage")
    with pytest.raises(ValueError, match="applies to text inputs"):
        gte_engine.encode(input_ids=IDS[0], prompt_name="query")


def test_dimensions_truncate_and_renormalise_where_allowed(gte, gte_engine):
    full = torch.tensor(gte_engine.encode(TEXTS[1])["embedding"])
    for d in (32, 64):
        out = gte_engine.encode(TEXTS[1], dimensions=d)["embedding"]
        assert_close(out, torch.nn.functional.normalize(full[:d], dim=-1))
    assert len(gte_engine.encode(TEXTS[1], dimensions=128)["embedding"]) == 128
    with pytest.raises(ValueError, match="reduced sizes are 32, 64"):
        gte_engine.encode(TEXTS[1], dimensions=48)


def test_http_routes(gte):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(gte)(QUERY + TEXTS[0]).input_ids
    want = hf_embedding(gte, ids)
    with engine_server(gte, "--is-embedding", "--served-model-name", "gte") as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        resp = client.embeddings.create(model="gte", input=[TEXTS[0]], dimensions=32,
                                        extra_body={"prompt_name": "query"})
        assert_close(resp.data[0].embedding, torch.nn.functional.normalize(want[:32], dim=-1))
        native = httpx.post(url + "/encode", json={"text": TEXTS[0], "prompt_name": "query"}, timeout=60)
        assert_close(native.json()["embedding"], want)
        for route, body, message in [
            ("/v1/embeddings", {"input": "hi", "dimensions": 48}, "reduced sizes are 32, 64"),
            ("/v1/embeddings", {"input": "hi", "dimensions": 0}, "from 1 to 128"),
            ("/encode", {"text": "hi", "prompt_name": "nope"}, "prompt_name 'nope'"),
            ("/encode", {"input_ids": [1, 2], "prompt_name": "query"}, "applies to text inputs"),
        ]:
            bad = httpx.post(url + route, json=body, timeout=60)
            assert bad.status_code == 400, bad.text
            assert message in bad.json()["error"]["message"]
