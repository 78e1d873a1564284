"""Sampling building blocks without a model: params and defaults, penalties against a
reference rule, filters, seeded draws, logprob tuples, grammar helpers."""

from __future__ import annotations

import json
import time
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from radixfleet.engine.sampling.custom_logit_processor import load_processor
from radixfleet.engine.sampling.grammar import GrammarQueue, grammar_key
from radixfleet.engine.sampling.logprobs import TEXT_FLAG, ReqOutputs, fill_texts
from radixfleet.engine.sampling.params import SamplingParams, load_generation_defaults
from radixfleet.engine.sampling.penalties import PenaltyState, apply_penalties
from radixfleet.engine.sampling.sampler import SamplingBatchInfo, sample

V = 50


@pytest.mark.parametrize("bad, name", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"top_k": -5}, "top_k"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": 2.1}, "repetition_penalty"),
    ({"min_new_tokens": 5, "max_new_tokens": 2}, "min_new_tokens"),
    ({"n": 0}, "n"),
    ({"json_schema": "{}", "regex": "a"}, "only one of"),
    ({"no_such_key": 1}, "unknown sampling parameter"),
    ({"custom_params": [1]}, "custom_params"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
])
def test_invalid_params_name_the_parameter(bad, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams.from_dict(bad)


def test_generation_config_defaults_fill_only_omitted_keys(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_length": 99, "eos_token_id": 2}))
    defaults = load_generation_defaults(str(tmp_path))
    assert defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    p = SamplingParams.from_dict({"top_p": 0.5})
    p.apply_defaults(defaults)
    assert (p.temperature, p.top_p, p.top_k) == (0.6, 0.5, 20)
    greedy = SamplingParams.from_dict({"temperature": 0})
    greedy.apply_defaults(defaults)
    assert greedy.is_greedy  # an explicit temperature 0 is never overridden
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert load_generation_defaults(str(tmp_path)) == {}


def _reference_penalize(logits, prompt, out, f, p, r):
    """The documented rules, one token at a time."""
    logits = logits.clone()
    for t in set(prompt) | set(out):
        logits[t] = logits[t] / r if logits[t] > 0 else logits[t] * r
    for t, c in Counter(out).items():
        logits[t] -= f * c + p
    return logits


@pytest.mark.parametrize("f, p, r", [(0.7, 0, 1), (0, 1.2, 1), (0, 0, 1.4), (-0.5, 0.3, 0.8), (1, 1, 1.2)])
def test_penalties_match_the_reference_rule(f, p, r):
    torch.manual_seed(0)
    logits = torch.randn(2, V)
    prompts, outs = [[1, 2, 3], [4, 4]], [[3, 5, 5, 5], [7]]
    state = PenaltyState(4, V, torch.device("cpu"))
    reqs = [SimpleNamespace(rid="a", row=2, input_ids=prompts[0], output_ids=outs[0][:-1]),
            SimpleNamespace(rid="b", row=0, input_ids=prompts[1], output_ids=[])]
    rows = state.prepare(reqs)
    state.record(rows, torch.tensor([outs[0][-1], outs[1][-1]]))  # counts kept step by step
    col = torch.tensor([[f], [f]]), torch.tensor([[p], [p]]), torch.tensor([[r], [r]])
    got = state.apply(logits, rows, *col)
    for i in range(2):
        assert torch.allclose(got[i], _reference_penalize(logits[i], prompts[i], outs[i], f, p, r))


def test_penalty_row_reused_by_another_request_is_rebuilt():
    """A retracted request that comes back on its old row after another request used the
    row must not see that request's counts."""
    state = PenaltyState(2, V, torch.device("cpu"))
    first = SimpleNamespace(rid="first", row=1, input_ids=[1], output_ids=[3, 3])
    rows = state.prepare([first])
    other = SimpleNamespace(rid="other", row=1, input_ids=[2], output_ids=[])
    rows = state.prepare([other])
    state.record(rows, torch.tensor([9]))
    rows = state.prepare([first])  # back on row 1
    counts = state._counts[rows[0]]
    assert counts[3] == 2 and counts[9] == 0
    assert state._in_prompt[rows[0], 1] and not state._in_prompt[rows[0], 2]


def test_penalty_direction():
    logits = torch.zeros(1, V)
    logits[0, 3] = 1.0
    counts = torch.zeros(1, V, dtype=torch.int32)
    counts[0, 3] = 2
    none = torch.zeros(1, V, dtype=torch.bool)
    one = torch.ones(1, 1)
    for f, p, r, lower in [(1, 0, 1, True), (-1, 0, 1, False), (0, 1, 1, True), (0, -1, 1, False),
                           (0, 0, 1.5, True), (0, 0, 0.5, False)]:
        out = apply_penalties(logits, counts, none, f * one, p * one, r * one)
        assert (out[0, 3] < logits[0, 3]) == lower
        assert out[0, 4] == 0  # unseen tokens untouched


def _info(params):
    return SamplingBatchInfo.build([SamplingParams.from_dict(p) for p in params], V, "cpu")


def test_topk1_tiny_top_p_and_min_p_1_are_greedy():
    torch.manual_seed(1)
    logits = torch.randn(6, V)
    info = _info([{"top_k": 1}, {"top_p": 1e-9}, {"min_p": 1.0}, {"temperature": 0},
                  {"top_k": 1, "temperature": 3}, {"top_p": 1e-9, "seed": 3}])
    for _ in range(5):
        assert torch.equal(sample(logits.clone(), info), logits.argmax(-1))


def test_seeded_rows_repeat_and_differ_by_seed():
    logits = torch.zeros(3, V)  # uniform: any two seeds almost surely differ somewhere
    info = _info([{"seed": 5}, {"seed": 5}, {"seed": 6}])
    draws = torch.stack([sample(logits, SamplingBatchInfo.build(
        [SamplingParams.from_dict({"seed": s}) for s in (5, 5, 6)], V, "cpu", [k] * 3)) for k in range(20)])
    assert torch.equal(draws[:, 0], draws[:, 1])
    assert not torch.equal(draws[:, 0], draws[:, 2])
    assert info.seeded and info.seeded[0][1] == info.seeded[1][1]


def test_top_k_and_top_p_keep_only_allowed_tokens():
    logits = torch.arange(V, dtype=torch.float32).repeat(2, 1)
    info = _info([{"top_k": 3}, {"top_p": 0.5}])
    seen = [set(), set()]
    for _ in range(200):
        a, b = sample(logits, info).tolist()
        seen[0].add(a)
        seen[1].add(b)
    assert seen[0] <= {V - 1, V - 2, V - 3}
    probs = torch.softmax(logits[1], -1).sort(descending=True).values
    nucleus = int((probs.cumsum(0) - probs <= 0.5).sum())
    assert seen[1] <= set(range(V - nucleus, V))


def test_logprob_positions_and_prefix_limit():
    out = ReqOutputs(prompt_len=6, return_logprob=True, logprob_start_len=2)
    assert out.first_position == 1 and out.prefix_limit() == 1
    hidden = torch.randn(6, 4)
    head = torch.nn.Linear(4, V)
    ids = [1, 2, 3, 4, 5, 6]
    out.collect_prompt(hidden[1:3], 1, ids, head)  # a chunk, then the rest
    assert not out.prompt_done
    out.collect_prompt(hidden[3:], 3, ids, head)
    assert out.prompt_done and out.prefix_limit() is None
    lp = torch.log_softmax(head(hidden).float(), -1)
    expected = [(lp[p - 1, ids[p]].item(), ids[p], None) for p in range(2, 6)]
    assert [t for _, t, _ in out.input_token_logprobs] == [t for _, t, _ in expected]
    assert all(abs(a[0] - b[0]) < 1e-6 for a, b in zip(out.input_token_logprobs, expected, strict=True))
    last = ReqOutputs(prompt_len=6, return_logprob=True)  # -1: the last prompt token only
    assert last.logprob_start_len == 5


def test_fill_texts_only_when_asked():
    meta = {"output_token_logprobs": [(-0.1, 7, None)], "output_top_logprobs": [[(-0.1, 7, None), (-2, 8, None)]],
            "input_top_logprobs": [None], TEXT_FLAG: True}
    fill_texts(meta, lambda ids: [f"t{i}" for i in ids])
    assert meta == {"output_token_logprobs": [(-0.1, 7, "t7")],
                    "output_top_logprobs": [[(-0.1, 7, "t7"), (-2, 8, "t8")]], "input_top_logprobs": [None]}
    plain = {"output_token_logprobs": [(-0.1, 7, None)]}
    fill_texts(plain, lambda ids: 1 / 0)
    assert plain == {"output_token_logprobs": [(-0.1, 7, None)]}


def test_grammar_key_and_compile_errors_are_per_request():
    from transformers import AutoTokenizer

    from radixfleet.engine.models.model_prep import prepare_default_model
    from radixfleet.engine.sampling.grammar import GrammarBackend

    assert grammar_key(SamplingParams.from_dict({"regex": "a+"})) == ("regex", "a+")
    assert grammar_key(SamplingParams.from_dict({})) is None
    path = str(prepare_default_model())
    backend = GrammarBackend(lambda: AutoTokenizer.from_pretrained(path), 49152)
    queue = GrammarQueue(lambda: backend)
    good, bad = SimpleNamespace(rid="a", grammar=None), SimpleNamespace(rid="b", grammar=None)
    queue.add(good, ("regex", "(yes|no)"))
    queue.add(bad, ("json_schema", '{"type": "objec'))
    assert backend.compile(("regex", "(yes|no)")) is backend.compile(("regex", "(yes|no)"))  # cached
    ready, failed = [], []
    deadline = time.monotonic() + 30
    while queue.pending and time.monotonic() < deadline:
        r, f = queue.take_ready()
        ready, failed = ready + r, failed + f
        time.sleep(0.02)
    assert ready == [good] and good.grammar is not None
    assert failed[0][0] is bad and failed[0][1].startswith("invalid json_schema")


def test_malformed_custom_logit_processor_is_a_value_error():
    with pytest.raises(ValueError, match="custom_logit_processor"):
        load_processor("not json")


def _reference_filter(probs, top_k, top_p, min_p):
    sorted_p, order = probs.sort(descending=True)
    keep = torch.zeros_like(sorted_p, dtype=torch.bool)
    mass = 0.0
    for i, p in enumerate(sorted_p.tolist()):
        if i == 0 or (i < top_k and mass <= top_p and p >= sorted_p[0] * min_p):
            keep[i] = True
        mass += p
    out = torch.zeros_like(probs)
    out[order[keep]] = sorted_p[keep]
    return out


@pytest.mark.parametrize("impl", ["_filter_windowed", "_filter_sync_free"])
@pytest.mark.parametrize("params", [{"top_p": 0.5}, {"top_p": 0.95, "top_k": 2000}, {"min_p": 0.5},
                                    {"top_k": 5}, {"top_p": 0.3, "min_p": 0.2}])
def test_filter_is_exact_beyond_the_candidate_window(params, impl):
    """Both filters (CPU's windowed one, and the sync-free one CUDA uses) against the rule."""
    from radixfleet.engine.sampling import sampler

    filter_probs = getattr(sampler, impl)

    vocab = 4096
    torch.manual_seed(2)
    # Row 0 nearly flat (nucleus far beyond 1024 tokens), row 1 peaked, row 2 unfiltered.
    # Distinct logits (no ties at a cut-off, where either of two equal tokens is right).
    ranks = torch.randperm(vocab).float()
    logits = torch.stack([ranks * 2e-4, ranks * 4e-3, torch.randn(vocab)])
    probs = torch.softmax(logits, -1)
    plist = [SamplingParams.from_dict(params), SamplingParams.from_dict(params), SamplingParams.from_dict({})]
    got = filter_probs(probs, SamplingBatchInfo.build(plist, vocab, "cpu"))
    for i, p in enumerate(plist):
        top_k = vocab if p.top_k < 0 else p.top_k
        assert torch.allclose(got[i], _reference_filter(probs[i], top_k, p.top_p, p.min_p))


def test_sync_free_filter_uses_the_top_k_window_only_when_every_row_has_a_cut():
    from radixfleet.engine.sampling.sampler import _filter_sync_free

    vocab = 3000
    probs = torch.softmax(torch.randn(2, vocab, generator=torch.Generator().manual_seed(4)), -1)
    both = SamplingBatchInfo.build([SamplingParams.from_dict({"top_k": 7}),
                                    SamplingParams.from_dict({"top_k": 40, "top_p": 0.5})], vocab, "cpu")
    assert both.top_k_window == 40
    mixed = SamplingBatchInfo.build([SamplingParams.from_dict({"top_k": 7}), SamplingParams.from_dict({})],
                                    vocab, "cpu")
    assert mixed.top_k_window == 0
    got = _filter_sync_free(probs, mixed)
    assert int((got[0] > 0).sum()) == 7 and torch.equal(got[1], probs[1])  # unfiltered row intact
