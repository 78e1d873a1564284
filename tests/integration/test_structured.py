"""Structured outputs (xgrammar) and custom logit processors on a real engine.

Outputs are checked independently of xgrammar: JSON with ``jsonschema``, regex with
Python's ``re.fullmatch``, EBNF with an equivalent hand-written recogniser."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from radixfleet.engine.engine import Engine
from radixfleet.engine.sampling.custom_logit_processor import CustomLogitProcessor

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user", "guest"]}},
    "required": ["name", "age", "role"]}
ORDER = {"type": "object", "properties": {
    "id": {"type": "integer"},
    "items": {"type": "array", "maxItems": 3, "minItems": 1, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "maxLength": 8},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"]}},
    "status": {"enum": ["open", "paid", "shipped"]}},
    "required": ["id", "items", "status"]}
CITY = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20},
    "country": {"type": "string", "maxLength": 20},
    "location": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                 "required": ["lat", "lon"]},
    "capital": {"type": "boolean"}},
    "required": ["city", "country", "location", "capital"]}
BOOK = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 24},
    "authors": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 2},
    "year": {"type": "integer", "minimum": 1400, "maximum": 2030},
    "genre": {"enum": ["fiction", "science", "history"]}},
    "required": ["title", "authors", "year", "genre"]}
FLAGS = {"type": "object", "properties": {
    "enabled": {"type": "boolean"},
    "level": {"enum": [1, 2, 3]},
    "meta": {"type": "object", "properties": {"owner": {"type": "string", "maxLength": 10},
                                              "tags": {"type": "array", "maxItems": 2,
                                                       "items": {"enum": ["a", "b", "c"]}}},
             "required": ["owner", "tags"]}},
    "required": ["enabled", "level", "meta"]}
SCHEMAS = [PERSON, ORDER, CITY, BOOK, FLAGS]
PROMPTS = ["Here is the record in JSON:\n", "<|im_start|>user\nGive me an example as JSON.<|im_end|>\n"
           "<|im_start|>assistant\n", "JSON:", "Example output:\n"]


@pytest.fixture(scope="module")
def engine(model_dir):
    with Engine(model_path=model_dir, max_total_tokens=8192, enable_custom_logit_processor=True) as e:
        yield e


def test_twenty_json_schema_requests_parse_and_validate(engine):
    cases = [(s, p) for s in SCHEMAS for p in PROMPTS]
    assert len(cases) == 20
    params = [{"temperature": 0 if i % 2 else 0.8, "seed": i, "max_new_tokens": 160,
               "json_schema": json.dumps(s)} for i, (s, _) in enumerate(cases)]
    outs = engine.generate([p for _, p in cases], params)  # one batch: mixed masks per step
    for (schema, _), out in zip(cases, outs, strict=True):
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        jsonschema.validate(json.loads(out["text"]), schema)


@pytest.mark.parametrize("pattern", [
    r"(yes|no)",
    r"\d{3}-\d{4}",
    r"[A-Z][a-z]{2,8} (is|was) (red|blue|green)\.",
    r"(0|[1-9][0-9]{0,5})(\.[0-9]{1,2})?",
    r"[a-z]{1,12}@[a-z]{1,12}\.(com|org)",
])
def test_regex_outputs_fullmatch(engine, pattern):
    outs = engine.generate(["Answer:", "Write it:"], [
        {"temperature": 0, "max_new_tokens": 32, "regex": pattern},
        {"temperature": 1.0, "seed": 7, "max_new_tokens": 32, "regex": pattern}])
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "stop"
        assert re.fullmatch(pattern, out["text"]), out["text"]


ARITH = 'root ::= num (op num){0,3} "=" \nnum ::= [1-9] [0-9]? \nop ::= " + " | " - " | " * "'
LISTS = 'root ::= list \nlist ::= "[" (item ("," item){0,2})? "]" \nitem ::= [a-c] | list'


def in_lists(text: str) -> bool:
    """Recogniser for LISTS: nested lists of a/b/c with at most three items."""
    pos = 0

    def parse_list() -> bool:
        nonlocal pos
        if text[pos:pos + 1] != "[":
            return False
        pos += 1
        n = 0
        while text[pos:pos + 1] != "]":
            if n and text[pos:pos + 1] != ",":
                return False
            pos += bool(n)
            if text[pos:pos + 1] in ("a", "b", "c"):
                pos += 1
            elif not parse_list():
                return False
            n += 1
            if n > 3 or pos >= len(text):
                return False
        pos += 1
        return True

    return parse_list() and pos == len(text)


def test_ebnf_outputs_are_in_the_language(engine):
    outs = engine.generate(["Compute: ", "Arithmetic:", "A nested list:", "Lists:"], [
        {"temperature": 0, "max_new_tokens": 32, "ebnf": ARITH},
        {"temperature": 1.0, "seed": 3, "max_new_tokens": 32, "ebnf": ARITH},
        {"temperature": 0, "max_new_tokens": 48, "ebnf": LISTS},
        {"temperature": 1.0, "seed": 4, "max_new_tokens": 48, "ebnf": LISTS}])
    for out in outs[:2]:
        assert re.fullmatch(r"[1-9][0-9]?( [-+*] [1-9][0-9]?){0,3}=", out["text"]), out["text"]
    for out in outs[2:]:
        if out["meta_info"]["finish_reason"]["type"] == "stop":
            assert in_lists(out["text"]), out["text"]
        else:  # ran out of tokens inside a deep nesting: still a prefix of the language
            assert set(out["text"]) <= set("[],abc")
    assert outs[2]["meta_info"]["finish_reason"]["type"] == "stop"


def test_invalid_grammars_fail_only_their_request(engine):
    good = {"temperature": 0, "max_new_tokens": 8, "regex": "(yes|no)"}
    bad_cases = [({"json_schema": '{"type": "objec'}, "invalid json_schema"),
                 ({"regex": "[a-"}, "invalid regex"),
                 ({"ebnf": 'root ::= "a" | '}, "invalid ebnf")]

    async def run():
        tasks = [engine.async_generate("Answer:", good)]
        tasks += [engine.async_generate("Answer:", {"max_new_tokens": 8, **bad}) for bad, _ in bad_cases]
        tasks.append(engine.async_generate("Answer:", {"temperature": 0, "max_new_tokens": 4}))
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(run())
    assert results[0]["text"] in ("yes", "no")
    for (_, message), res in zip(bad_cases, results[1:4], strict=True):
        assert isinstance(res, ValueError) and message in str(res), res
    assert results[4]["meta_info"]["completion_tokens"] == 4


def test_streaming_with_a_grammar(engine):
    pattern = r"[A-Z][a-z]{2,8} (is|was) (red|blue|green)\."
    chunks = list(engine.generate("Say it:", {"temperature": 0, "max_new_tokens": 32, "regex": pattern},
                                  stream=True))
    assert re.fullmatch(pattern, "".join(c["text"] for c in chunks))


class ForceToken(CustomLogitProcessor):
    """Always picks ``custom_params["token_id"]``."""

    def __call__(self, logits, custom_param_list):
        for i, params in enumerate(custom_param_list):
            logits[i, :] = float("-inf")
            logits[i, params["token_id"]] = 0.0
        return logits


def test_custom_logit_processor_with_custom_params(engine):
    outs = engine.generate(["The capital of France is", "Hello", "Hi"], [
        {"temperature": 0, "max_new_tokens": 4, "custom_params": {"token_id": 5}},
        {"temperature": 0.9, "max_new_tokens": 4, "custom_params": {"token_id": 42}},
        {"temperature": 0, "max_new_tokens": 4}],
        custom_logit_processor=[ForceToken.to_str(), ForceToken.to_str(), None])
    assert outs[0]["output_ids"] == [5] * 4
    assert outs[1]["output_ids"] == [42] * 4
    assert outs[2]["output_ids"] != [5] * 4
    with pytest.raises(ValueError, match="custom_logit_processor"):
        engine.generate("Hi", {"max_new_tokens": 2}, custom_logit_processor='{"callable": "00"}')
