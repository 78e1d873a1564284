"""Sessions on the default model (CPU): each turn equals a plain request whose prompt is the
turn it continues from (cut or trimmed as asked) plus the new input, and reuses that
context's KV from the radix cache."""

from __future__ import annotations

import time

import httpx
import pytest
from server_process import engine_server

from radixfleet import Engine

GREEDY = {"temperature": 0, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def engine(model_dir):
    with Engine(model_path=model_dir, max_total_tokens=8192) as e:
        yield e


def ids(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer_manager.tokenizer.encode(text)


def plain(engine: Engine, prompt_ids: list[int]) -> list[int]:
    return engine.generate(input_ids=prompt_ids, sampling_params=GREEDY)["output_ids"]


def test_turns_continue_from_the_previous_turn(engine):
    sid = engine.open_session(capacity_of_str_len=4096)
    first = engine.generate("My name is Alice and I live in Paris.", GREEDY, session_params={"id": sid},
                            rid="t1")
    context = ids(engine, "My name is Alice and I live in Paris.") + first["output_ids"]
    second = engine.generate(" What is my name?", GREEDY, session_params={"id": sid}, rid="t2")
    want = context + ids(engine, " What is my name?")
    assert second["meta_info"]["prompt_tokens"] == len(want)
    assert second["meta_info"]["cached_tokens"] >= len(context) - 1  # the context was not recomputed
    assert second["output_ids"] == plain(engine, want)
    engine.close_session(sid)


def test_rid_offset_drop_previous_output_and_replace(engine):
    sid = engine.open_session(4096)
    prompt1 = ids(engine, "Count: one, two,")
    t1 = engine.generate(input_ids=prompt1, sampling_params=GREEDY, session_params={"id": sid}, rid="a")
    engine.generate(input_ids=ids(engine, " and then"), sampling_params=GREEDY, session_params={"id": sid}, rid="b")

    new = ids(engine, " three")
    dropped = engine.generate(input_ids=new, sampling_params=GREEDY, rid="c",
                              session_params={"id": sid, "rid": "a", "drop_previous_output": True})
    assert dropped["meta_info"]["prompt_tokens"] == len(prompt1) + len(new)
    assert dropped["output_ids"] == plain(engine, prompt1 + new)

    cut = engine.generate(input_ids=new, sampling_params=GREEDY, rid="d",
                          session_params={"id": sid, "rid": "a", "offset": 2})
    assert cut["output_ids"] == plain(engine, prompt1[:2] + new)

    # replace: the turns that continued from "a" ("b", "c", "d") are dropped
    engine.generate(input_ids=new, sampling_params=GREEDY, rid="e",
                    session_params={"id": sid, "rid": "a", "replace": True})
    with pytest.raises(ValueError, match="no finished request 'b'"):
        engine.generate(input_ids=new, sampling_params=GREEDY, session_params={"id": sid, "rid": "b"})
    latest = engine.generate(input_ids=new, sampling_params=GREEDY, session_params={"id": sid}, rid="f")
    e_tokens = prompt1 + t1["output_ids"] + new
    assert latest["meta_info"]["prompt_tokens"] > len(e_tokens)  # continued from "e", the latest turn
    engine.close_session(sid)


def test_bad_session_calls_are_value_errors(engine):
    sid = engine.open_session(100, session_id="fixed")
    assert sid == "fixed"
    with pytest.raises(ValueError, match="already open"):
        engine.open_session(100, session_id="fixed")
    with pytest.raises(ValueError, match="capacity_of_str_len"):
        engine.open_session(0)
    engine.generate("Hi", GREEDY, session_params={"id": "fixed"}, rid="h")
    with pytest.raises(ValueError, match="offset must be in"):
        engine.generate("Hi", GREEDY, session_params={"id": "fixed", "offset": 10**6})
    with pytest.raises(ValueError, match="one prompt"):
        engine.generate(["a", "b"], GREEDY, session_params={"id": "fixed"})
    with pytest.raises(ValueError, match="unknown session_params key"):
        engine.generate("Hi", GREEDY, session_params={"id": "fixed", "bogus": 1})
    engine.close_session("fixed")
    with pytest.raises(ValueError, match="is not open"):
        engine.close_session("fixed")
    with pytest.raises(ValueError, match="is not open"):
        engine.generate("Hi", GREEDY, session_params={"id": "fixed"})
    short = engine.open_session(100, timeout=0.2)
    time.sleep(0.4)
    with pytest.raises(ValueError, match="is not open"):
        engine.generate("Hi", GREEDY, session_params={"id": short})
    assert engine.generate("Hi", GREEDY)["output_ids"]


def test_http_session_routes(model_dir):
    with engine_server(model_dir) as url:
        sid = httpx.post(url + "/open_session", json={"capacity_of_str_len": 1000}, timeout=30).json()
        body = {"text": "The capital of France is", "sampling_params": GREEDY, "rid": "one",
                "session_params": {"id": sid}}
        first = httpx.post(url + "/generate", json=body, timeout=60).json()
        second = httpx.post(url + "/generate", json={**body, "text": " and of Italy", "rid": "two"}, timeout=60)
        assert second.status_code == 200
        assert second.json()["meta_info"]["prompt_tokens"] > first["meta_info"]["prompt_tokens"] + 8
        assert httpx.post(url + "/close_session", json={"session_id": sid}, timeout=30).status_code == 200
        gone = httpx.post(url + "/generate", json={**body, "rid": "three"}, timeout=60)
        assert gone.status_code == 400 and "is not open" in gone.json()["error"]["message"]
        bad = httpx.post(url + "/open_session", json={"capacity_of_str_len": -1}, timeout=30)
        assert bad.status_code == 400
