"""Each policy's decision rule, including cache_aware's imbalance switch."""

from __future__ import annotations

import collections

import pytest

from radixfleet.router.circuit_breaker import CircuitBreaker
from radixfleet.router.config import RouterConfig
from radixfleet.router.policies.cache_aware import CacheAwarePolicy
from radixfleet.router.policies.registry import POLICIES, make_policy
from radixfleet.router.worker import Worker


def workers(*loads: int) -> list[Worker]:
    return [Worker(f"http://w{i}:1", CircuitBreaker(2, 1.0), in_flight=n) for i, n in enumerate(loads)]


def cache_aware(ws: list[Worker], **kw) -> CacheAwarePolicy:
    policy = make_policy(RouterConfig(policy="cache_aware", **kw))
    assert isinstance(policy, CacheAwarePolicy)
    for w in ws:
        policy.add_worker(w.url)
    return policy


def test_registry_has_every_policy_named_in_the_config():
    from radixfleet.router.config import POLICY_NAMES

    assert set(POLICIES) == set(POLICY_NAMES)


def test_round_robin_cycles():
    ws = workers(0, 0, 0)
    policy = make_policy(RouterConfig(policy="round_robin"))
    picks = [policy.select(ws, "x")[0].url for _ in range(6)]
    assert picks == [w.url for w in ws] * 2


def test_random_uses_every_worker():
    ws = workers(0, 0)
    policy = make_policy(RouterConfig(policy="random"))
    assert {policy.select(ws, "")[0].url for _ in range(100)} == {w.url for w in ws}


def test_power_of_two_prefers_the_less_loaded_of_two():
    ws = workers(10, 0)
    policy = make_policy(RouterConfig(policy="power_of_two"))
    assert all(policy.select(ws, "")[0] is ws[1] for _ in range(20))


def test_cache_aware_follows_the_longest_prefix_when_balanced():
    ws = workers(0, 0)
    policy = cache_aware(ws)
    system = "You are a helpful assistant. " * 10
    first, decision = policy.select(ws, system + "question one")
    assert decision == "miss"
    for i in range(10):
        w, decision = policy.select(ws, system + f"question {i}")
        assert (w, decision) == (first, "hit")


def test_cache_aware_sends_unmatched_text_to_the_smallest_tree():
    ws = workers(0, 0)
    policy = cache_aware(ws)
    policy.trees[ws[0].url].insert("a" * 1000)
    w, decision = policy.select(ws, "something new entirely")
    assert (w, decision) == (ws[1], "miss")


def test_cache_aware_threshold_is_strict():
    for text, expected, decision in (("aaaabbbb", 1, "miss"), ("aaaab", 0, "hit")):
        ws = workers(0, 0)
        policy = cache_aware(ws, cache_threshold=0.5)
        policy.trees[ws[0].url].insert("aaaa")
        policy.trees[ws[1].url].insert("z")
        # w0 matches 4 characters: 4/8 = 0.5 is not > 0.5 (smallest tree wins), 4/5 is
        assert policy.select(ws, text) == (ws[expected], decision)


def test_cache_aware_switches_to_least_loaded_when_imbalanced():
    ws = workers(40, 5)
    policy = cache_aware(ws, balance_abs_threshold=32, balance_rel_threshold=1.5)
    text = "shared prefix " * 20
    policy.trees[ws[0].url].insert(text)
    w, decision = policy.select(ws, text)
    assert (w, decision) == (ws[1], "imbalanced")
    assert policy.trees[ws[1].url].match(text) == len(text)  # the chosen tree learns the text


@pytest.mark.parametrize(
    "loads, imbalanced",
    [
        ((33, 0), True),  # diff 33 > 32 and 33 > 1.0001 * 0
        ((32, 0), False),  # diff not > 32
        ((100, 67), True),
        ((100, 68), False),
    ],
)
def test_imbalance_needs_both_thresholds(loads, imbalanced):
    policy = cache_aware(workers(*loads))
    assert policy.is_imbalanced(loads) is imbalanced


def test_imbalance_relative_threshold_alone_can_keep_it_balanced():
    policy = cache_aware(workers(0, 0), balance_abs_threshold=10, balance_rel_threshold=3.0)
    assert policy.is_imbalanced([50, 20]) is False  # diff 30 > 10 but 50 < 3 * 20
    assert policy.is_imbalanced([61, 20]) is True


def test_cache_aware_spreads_distinct_prefix_groups():
    ws = workers(0, 0, 0, 0)
    policy = cache_aware(ws)
    owner = {}
    for rep in range(5):
        for g in range(8):
            w, _ = policy.select(ws, f"system prompt of group {g} " * 30 + f"user turn {rep}")
            owner.setdefault(g, w.url)
            assert owner[g] == w.url
    assert set(collections.Counter(owner.values()).values()) == {2}  # 8 groups over 4 workers, 2 each


def test_removed_worker_is_forgotten_by_cache_aware():
    ws = workers(0, 0)
    policy = cache_aware(ws)
    policy.select(ws, "abc" * 10)
    policy.remove_worker(ws[0].url)
    policy.remove_worker(ws[1].url)
    assert policy.trees == {}


def test_maintain_evicts_to_max_tree_size():
    ws = workers(0)
    policy = cache_aware(ws, max_tree_size=100)
    for i in range(20):
        policy.select(ws, f"{i:03d}" + "x" * 50)
    assert policy.stats()[ws[0].url] > 100
    policy.maintain()
    assert policy.stats()[ws[0].url] <= 100
