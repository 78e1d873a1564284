"""Embedding options from a model folder: sentence-transformers prompts (a default prompt
applies to text inputs only), and which ``dimensions`` a config allows."""

from __future__ import annotations

import json
import math

import pytest

from radixfleet.engine.models.embedding_options import (
    apply_prompt,
    check_dimensions,
    folder_options,
    truncate,
)


def test_prompts_and_default_prompt(tmp_path):
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": "query"}))
    info = folder_options(str(tmp_path), {})
    assert info["matryoshka_dimensions"] is None
    assert apply_prompt(info, ["a", "b"], None) == ["query: a", "query: b"]  # the default
    assert apply_prompt(info, ["a"], "passage") == ["passage: a"]
    assert apply_prompt(info, None, None) is None  # token ids: taken as given
    with pytest.raises(ValueError, match="applies to text inputs"):
        apply_prompt(info, None, "query")
    with pytest.raises(ValueError, match="prompts are passage, query"):
        apply_prompt(info, ["a"], ["query"])
    (tmp_path / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "q: "}, "default_prompt_name": "doc"}))
    with pytest.raises(ValueError, match="default_prompt_name 'doc' is not one of the prompts"):
        folder_options(str(tmp_path), {})


def test_no_prompts_without_the_file(tmp_path):
    info = folder_options(str(tmp_path), {"is_matryoshka": True})
    assert apply_prompt(info, ["a"], None) == ["a"]
    with pytest.raises(ValueError, match="this model's prompts are none"):
        apply_prompt(info, ["a"], "query")


@pytest.mark.parametrize("hf, dims, want", [
    ({}, None, None), ({}, 8, None),  # the model's own size: nothing to do
    ({"is_matryoshka": True}, 3, 3), ({"matryoshka_dimensions": [4, 2]}, 2, 2),
])
def test_allowed_dimensions(tmp_path, hf, dims, want):
    info = {**folder_options(str(tmp_path), hf), "embedding_dim": 8}
    assert check_dimensions(info, dims) == want


@pytest.mark.parametrize("hf, dims, message", [
    ({}, 4, "no reduced-dimension embeddings"),
    ({"is_matryoshka": True}, 0, "from 1 to 8"), ({"is_matryoshka": True}, 9, "from 1 to 8"),
    ({"is_matryoshka": True}, 2.5, "from 1 to 8"), ({"is_matryoshka": True}, True, "from 1 to 8"),
    ({"matryoshka_dimensions": [4, 2]}, 3, "reduced sizes are 2, 4"),
])
def test_refused_dimensions(tmp_path, hf, dims, message):
    info = {**folder_options(str(tmp_path), hf), "embedding_dim": 8}
    with pytest.raises(ValueError, match=message):
        check_dimensions(info, dims)


def test_truncate_renormalises_only_normalised_models():
    v = [0.6, 0.0, 0.8, 0.0]
    assert truncate(v, None, True) is v
    head = truncate(v, 1, True)
    assert head == [1.0]
    assert truncate(v, 3, False) == [0.6, 0.0, 0.8]
    assert math.isclose(sum(x * x for x in truncate([3.0, 4.0, 5.0], 2, True)), 1.0)
