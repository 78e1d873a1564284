"""RouterConfig validation, the generated CLI flags, text keys and the circuit breaker."""

from __future__ import annotations

import time

import pytest

from radixfleet.router.circuit_breaker import CircuitBreaker, CircuitState
from radixfleet.router.cli import parse_config
from radixfleet.router.config import RouterConfig
from radixfleet.router.policies.text_key import text_key
from radixfleet.router.worker import InvalidWorkerURL, normalize_url


def test_flags_are_generated_from_the_config_fields():
    config = parse_config(["--worker-urls", "http://a:1", "http://b:2", "--policy", "round_robin",
                           "--cache-threshold", "0.3", "--max-tree-size", "1000", "--api-key", "k"])
    assert config.worker_urls == ("http://a:1", "http://b:2")
    assert (config.policy, config.cache_threshold, config.max_tree_size, config.api_key) == ("round_robin", 0.3, 1000, "k")
    assert parse_config([]) == RouterConfig()


def test_invalid_values_are_rejected_with_a_reason():
    with pytest.raises(ValueError, match="cache_threshold must be in"):
        RouterConfig(cache_threshold=1.5)
    with pytest.raises(SystemExit):
        parse_config(["--policy", "fastest"])


def test_chat_key_is_the_whole_conversation():
    body = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                         {"role": "assistant", "content": [{"type": "text", "text": "A1"}]}, {"role": "user", "content": "U2"}]}
    assert text_key("/v1/chat/completions", body) == "system: S\nuser: U1\nassistant: A1\nuser: U2\n"


def test_generate_and_completion_keys():
    assert text_key("/generate", {"text": "abc"}) == "abc"
    assert text_key("/generate", {"input_ids": [1, 2]}) == "[1, 2]"
    assert text_key("/v1/completions", {"prompt": "p"}) == "p"
    assert text_key("/v1/completions", "not a dict") == ""


def test_worker_urls_are_normalized_or_rejected():
    assert normalize_url("http://127.0.0.1:30001/") == "http://127.0.0.1:30001"
    for bad in ("127.0.0.1:30001", "ftp://x:1", "http://x:1/generate", "not a url"):
        with pytest.raises(InvalidWorkerURL):
            normalize_url(bad)


def test_circuit_opens_then_half_opens_for_one_probe():
    cb = CircuitBreaker(failure_threshold=2, cooldown=0.05)
    cb.record_failure()
    assert cb.state is CircuitState.CLOSED
    cb.record_failure()
    assert cb.state is CircuitState.OPEN and not cb.available()
    time.sleep(0.06)
    assert cb.state is CircuitState.HALF_OPEN and cb.available()
    cb.on_dispatch()
    assert not cb.available()  # only one probe at a time
    cb.record_failure()
    assert cb.state is CircuitState.OPEN
    time.sleep(0.06)
    cb.on_dispatch()
    cb.record_success()
    assert cb.state is CircuitState.CLOSED and cb.available()
