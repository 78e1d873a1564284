"""The precise policy's decision rule on a hand-fed KV index: the documented cost (uncached
prompt tokens + load_tokens per request in flight), the per-worker fallback to the
approximate tree while a worker's events are late or broken, and ``auto``'s switch."""

from __future__ import annotations

import pytest

from radixfleet import kv_events
from radixfleet.kv_events import Snapshot
from radixfleet.router.circuit_breaker import CircuitBreaker
from radixfleet.router.config import RouterConfig
from radixfleet.router.policies.precise import PrecisePolicy, PromptKey
from radixfleet.router.policies.registry import make_policy
from radixfleet.router.worker import Worker

PROMPT = list(range(100, 164))  # 64 tokens: 4 blocks of 16


@pytest.fixture(scope="module")
def tok(model_dir) -> str:
    return model_dir  # the precise policy loads the model's tokenizer (keys here carry their ids)


def fleet(tok: str, *loads: int, policy: str = "precise", **kw) -> tuple[PrecisePolicy, list[Worker]]:
    ws = [Worker(f"http://w{i}:1", CircuitBreaker(2, 1.0), in_flight=n) for i, n in enumerate(loads)]
    p = make_policy(RouterConfig(policy=policy, tokenizer_path=tok, **kw))
    assert isinstance(p, PrecisePolicy)
    for w in ws:
        p.add_worker(w.url)
    return p, ws


def holds(p: PrecisePolicy, url: str, tokens: list[int], engine: str = "e") -> None:
    p.index.add_worker(url)
    p.index.on_snapshot(url, Snapshot(engine, 0, 16, kv_events.SEED, kv_events.prefix_hashes(tokens, 16)))


def key(ids: list[int], text: str = "") -> PromptKey:
    k = PromptKey(text or " ".join(map(str, ids)))
    k.ids = ids
    return k


def test_worker_holding_the_longest_prefix_wins_and_prediction_is_set(tok):
    p, ws = fleet(tok, 0, 0, 0)
    for w in ws:
        holds(p, w.url, [])
    holds(p, ws[1].url, PROMPT[:32])
    holds(p, ws[2].url, PROMPT[:48])
    k = key(PROMPT + [1])
    chosen, decision = p.select(ws, k)
    assert chosen is ws[2] and decision == "cached" and k.predicted == 48
    assert p.decided_by() == "precise"


def test_held_prefix_is_followed_and_misses_go_to_the_cheapest(tok):
    p, ws = fleet(tok, 1, 0)
    holds(p, ws[0].url, PROMPT[:48])
    holds(p, ws[1].url, [])
    ws[0].pending_prefill = 100  # busier, but holds 48 of 65 tokens (> cache_threshold 0.5)
    k = key(PROMPT + [1])
    chosen, decision = p.select(ws, k)
    assert chosen is ws[0] and decision == "cached" and k.uncached == 17 and k.predicted == 48
    # Held below the threshold: placed by cost = 2 x uncached + pending_prefill + 32 x in_flight.
    holds(p, ws[0].url, PROMPT[:16])  # w0: 2 x 49 + 100 + 32 = 230 > w1: 2 x 65 = 130
    k = key(PROMPT + [1])
    chosen, decision = p.select(ws, k)
    assert chosen is ws[1] and decision == "uncached" and k.uncached == 65 and k.predicted == 0
    # w0 less busy: 98 + 40 + 32 = 170 > 130 still; with load_tokens 8: 146 > 130; and with
    # pending 0: 98 + 8 = 106 < 130, the held 16 tokens win.
    ws[0].pending_prefill = 40
    assert p.select(ws, key(PROMPT + [1]))[0] is ws[1]
    p2, ws2 = fleet(tok, 1, 0, load_tokens=8)
    holds(p2, ws2[0].url, PROMPT[:16])
    holds(p2, ws2[1].url, [])
    ws2[0].pending_prefill = 40
    assert p2.select(ws2, key(PROMPT + [1]))[0] is ws2[1]
    ws2[0].pending_prefill = 0
    assert p2.select(ws2, key(PROMPT + [1])) == (ws2[0], "uncached")


def test_uncached_weight_keeps_a_partly_held_prompt_where_it_is(tok):
    """Weight 1 (this request's wait alone) moves a prompt whose worker holds 16 of its 65
    tokens as soon as another is 16 tokens less busy, computing and holding those 16 twice;
    the default weight 2 moves it only for a wait longer by twice that."""
    for weight, moved in ((1.0, True), (2.0, False)):
        p, ws = fleet(tok, 0, 0, uncached_weight=weight)
        holds(p, ws[0].url, PROMPT[:16])
        holds(p, ws[1].url, [])
        ws[0].pending_prefill = 24  # w0: 49w + 24, w1: 65w
        assert (p.select(ws, key(PROMPT + [1]))[0] is ws[1]) is moved
    with pytest.raises(ValueError, match="uncached_weight"):
        RouterConfig(uncached_weight=0.5)


def test_requests_on_a_new_prefix_sent_at_once_follow_the_first(tok):
    """No event says w holds the prefix of a request still in flight there until the engine
    has prefilled it, yet sending a request sharing it elsewhere makes a second copy. It
    follows the first (ahead), and is predicted to find the shared prefix cached there: the
    engine caches a prompt once prefilled and holds back a request sharing it for that step."""
    p, ws = fleet(tok, 0, 0, 0)
    for w in ws:
        holds(p, w.url, [])
    first = key(PROMPT + [1])
    a, decision = p.select(ws, first)
    assert decision == "uncached"
    a.in_flight, a.pending_prefill, a.prompts_in_flight[1] = 1, first.uncached, first.ids  # as the proxy does
    second = key(PROMPT + [2])
    chosen, decision = p.select(ws, second)
    assert (chosen, decision) == (a, "cached") and second.predicted == 64 and second.uncached == 1
    # Shared below cache_threshold (16 of 65 tokens): placed by cost, and a is cheaper than an
    # idle worker only by the held part: 2 x 49 + 65 + 32 = 195 > 2 x 65.
    a.prompts_in_flight[1] = PROMPT[:16] + [7] * 49
    assert p.select(ws, key(PROMPT + [3]))[0] is not a
    # Once the first is done and its prefix evicted (no event says a holds it): nothing ahead.
    a.prompts_in_flight.clear()
    a.in_flight = a.pending_prefill = 0
    assert p.select(ws, key(PROMPT + [4]))[1] == "uncached"


def test_imbalanced_load_goes_to_the_least_loaded(tok):
    p, ws = fleet(tok, 40, 0)  # 40 - 0 > balance_abs_threshold 32
    holds(p, ws[0].url, PROMPT)
    holds(p, ws[1].url, [])
    assert p.select(ws, key(PROMPT + [1])) == (ws[1], "imbalanced")


def test_imbalanced_load_stays_on_a_holder_with_room(tok):
    """A hot prefix held by a worker that is busier than the least loaded but within the
    threshold stays there; the worker over the threshold gets nothing more, however much it
    holds, and a prompt no worker with room holds goes to the least loaded."""
    p, ws = fleet(tok, 3, 1, 0, balance_abs_threshold=2)  # 3 - 0 > 2: imbalanced
    holds(p, ws[0].url, PROMPT)
    holds(p, ws[1].url, PROMPT[:48])
    holds(p, ws[2].url, [])
    k = key(PROMPT + [1])
    assert p.select(ws, k) == (ws[1], "imbalanced") and k.predicted == 48
    ws[1].in_flight = 2  # no room left: one more would put it 3 ahead of the least loaded
    assert p.select(ws, key(PROMPT + [2])) == (ws[2], "imbalanced")
    ws[1].in_flight = 1
    assert p.select(ws, key(list(range(500, 564)))) == (ws[2], "imbalanced")  # held nowhere


def test_worker_out_of_sync_is_scored_by_the_approximate_tree(tok):
    p, ws = fleet(tok, 0, 0)
    holds(p, ws[0].url, [])
    holds(p, ws[1].url, [])
    text = "shared history " * 10
    p.approx._tree_for(ws[1].url).insert(text)  # the tree saw this text go to w1
    p.index.mark_syncing(ws[1].url)  # w1's event stream broke: not trusted until it resyncs
    k = key(PROMPT + [1], text + "new question")
    chosen, decision = p.select(ws, k)
    assert chosen is ws[1] and decision == "approximate" and k.predicted is None
    # Resynchronised, and the snapshot says w1 evicted it while w0 holds it: events win.
    holds(p, ws[1].url, [])
    holds(p, ws[0].url, PROMPT)
    chosen, decision = p.select(ws, key(PROMPT + [1], text + "new question"))
    assert chosen is ws[0] and decision == "cached"


def test_auto_is_cache_aware_unless_every_worker_is_in_sync(tok):
    p, ws = fleet(tok, 0, 0, policy="auto")
    holds(p, ws[0].url, PROMPT)
    _, decision = p.select(ws, key(PROMPT + [1]))
    assert p.decided_by() == "cache_aware" and decision in ("hit", "miss")
    holds(p, ws[1].url, [])
    chosen, decision = p.select(ws, key(PROMPT + [1]))
    assert p.decided_by() == "precise" and chosen is ws[0] and decision == "cached"
    # A request it could not tokenize is routed by text.
    p.select(ws, PromptKey("plain text"))
    assert p.decided_by() == "cache_aware"


def test_replicas_place_a_new_prefix_on_one_worker_despite_different_loads(tok):
    """Three router replicas see the same events but only their own requests in flight. A
    new prefix sent through each at once goes to one worker (rendezvous order of its first
    blocks among the near-cheapest), where the cheapest by each replica's own cost would
    differ; different prefixes still spread over the workers."""
    replicas = [fleet(tok, 0, 0, 0) for _ in range(3)]
    for i, (p, ws) in enumerate(replicas):
        for w in ws:
            holds(p, w.url, [])
        ws[i].pending_prefill = 40  # each replica sees its own share of the load on a different worker
    for tenant in range(12):
        prompt = [tenant] * 16 + PROMPT  # the tenant's own first block
        chosen = {p.select(ws, key(prompt + [1]))[0].url for p, ws in replicas}
        assert len(chosen) == 1, (tenant, chosen)
    first_choice = {replicas[0][0].select(replicas[0][1], key([t] * 16 + PROMPT + [1]))[0].url for t in range(12)}
    assert len(first_choice) == 3
    # A worker busier than the cheapest by more than placement_tolerance x n is not a candidate.
    p, ws = replicas[0]
    ws[0].pending_prefill, ws[1].pending_prefill = 0, 0
    ws[2].pending_prefill = 200  # > 1.0 x 81 tokens
    assert all(p.select(ws, key([t] * 16 + PROMPT + [1]))[0] is not ws[2] for t in range(12))


def test_a_new_prefix_avoids_workers_holding_far_more_than_the_emptiest(tok):
    """Placement also balances what the caches hold (by the events): a worker holding more
    than max(n, 10 %) tokens beyond the emptiest takes no new prefix."""
    p, ws = fleet(tok, 0, 0, 0)
    holds(p, ws[0].url, list(range(2000, 2000 + 16 * 40)))  # 640 tokens of someone else's
    holds(p, ws[1].url, list(range(3000, 3000 + 16 * 4)))   # 64
    holds(p, ws[2].url, [])
    picks = {p.select(ws, key([t] * 16 + PROMPT + [1]))[0].url for t in range(12)}
    assert picks == {ws[1].url, ws[2].url}


def test_placement_key_is_the_hash_of_the_first_blocks_past_the_held_prefix(tok):
    """The key a new prefix is placed by: the chained hash of its first placement_blocks
    blocks past what every worker holds (all its full blocks but the last token's if fewer),
    taken from the hashes the index lookup computed for the same request."""
    p, ws = fleet(tok, 0, 0, placement_blocks=2)
    for w in ws:
        holds(p, w.url, [])
    ids = PROMPT + [1]  # 65 tokens: 4 full blocks before the last token
    full = kv_events.prefix_hashes(PROMPT, 16)
    hashes: dict[tuple[int, int], list[int]] = {}
    p.index.matched_tokens([w.url for w in ws], ids, hashes)
    for held, block in ((0, 1), (16, 2), (32, 3), (48, 3)):
        assert p._placement_key(ws, ids, held, hashes) == full[block].to_bytes(8, "little"), held
    assert p._placement_key(ws, PROMPT[:16], 0, {}) is None  # the one block holds the last token


def test_placement_settings_are_validated():
    with pytest.raises(ValueError, match="placement_tolerance"):
        RouterConfig(placement_tolerance=-1)
    with pytest.raises(ValueError, match="placement_blocks"):
        RouterConfig(placement_blocks=0)


def test_a_replica_sees_another_replicas_request_through_its_queued_event(tok):
    """Replica A sends a request on a new prefix to worker w; replica B, which did not send it,
    learns of it from w's ``queued`` event and sends a request sharing the prefix to w too,
    predicting it cached there (the engine holds the second back one step for the first's
    prefill); once w reports the first settled and its blocks stored, the prediction stands
    on the stored blocks, and a settled request that left nothing behind predicts nothing."""
    (a, ws_a), (b, ws_b) = fleet(tok, 0, 0, 0), fleet(tok, 0, 0, 0)
    for p, ws in ((a, ws_a), (b, ws_b)):
        for w in ws:
            holds(p, w.url, [])
    first = key(PROMPT + [1])
    w = a.select(ws_a, first)[0].url
    queued = kv_events.EventBatch("e", 1, 0.0, [kv_events.queued("r1", kv_events.prefix_hashes(PROMPT, 16))])
    other = next(u.url for u in ws_b if u.url != w)
    ws_b[[u.url for u in ws_b].index(w)].pending_prefill = 80  # B sees its own load on w only
    second = key(PROMPT + [2])
    b.select(ws_b, second)
    assert second.predicted == 0  # without the event, B knows of nothing ahead anywhere
    b.index.on_message(w, queued)
    assert b.index.matched_tokens([w, other], second.ids) == {w: 0, other: 0}  # held: nothing yet
    second = key(PROMPT + [2])
    chosen, decision = b.select(ws_b, second)
    assert (chosen.url, decision, second.predicted, second.uncached) == (w, "cached", 64, 1)
    stored = kv_events.EventBatch("e", 2, 0.0, [kv_events.stored(kv_events.prefix_hashes(PROMPT, 16), None),
                                                kv_events.settled(["r1"])])
    b.index.on_message(w, stored)
    assert not b.index.workers[w].queued and not b.index.workers[w].queued_blocks
    third = key(PROMPT + [3])
    assert b.select(ws_b, third)[0].url == w and third.predicted == 64
    # Queued then settled without a prefill (aborted): nothing is about to be held.
    other_prompt = [9] * 48 + [1]
    b.index.on_message(w, kv_events.EventBatch("e", 3, 0.0, [kv_events.queued("r2", kv_events.prefix_hashes(other_prompt[:-1], 16))]))
    assert b.index.matched_tokens([w], other_prompt, queued=True)[w] == 48
    b.index.on_message(w, kv_events.EventBatch("e", 4, 0.0, [kv_events.settled(["r2"])]))
    assert b.index.matched_tokens([w], other_prompt, queued=True)[w] == 0
