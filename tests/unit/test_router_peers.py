"""Router replicas announcing their routing decisions to each other (``router/peers.py``):
over real ZMQ sockets, a decision one replica makes counts as queued on that worker in the
others' indexes at once, until the engine's own ``queued`` event for the prompt arrives or
the announcement expires; a replica ignores its own announcements; bad settings and bad
messages are refused with a reason."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq
from server_process import free_port

from radixfleet import kv_events
from radixfleet.kv_events import EventBatch, Snapshot
from radixfleet.router.circuit_breaker import CircuitBreaker
from radixfleet.router.config import RouterConfig
from radixfleet.router.kv_index import KVIndex
from radixfleet.router.metrics import RouterMetrics
from radixfleet.router.peers import TOPIC, PeerRoutes
from radixfleet.router.policies.precise import PrecisePolicy, PromptKey
from radixfleet.router.policies.registry import make_policy
from radixfleet.router.worker import Worker

PROMPT = list(range(100, 164))  # 64 tokens: 4 blocks of 16
HASHES = kv_events.prefix_hashes(PROMPT, 16)
W = "http://w0:1"


def live_index(*urls: str, held: list[int] | None = None) -> KVIndex:
    index = KVIndex()
    for url in urls:
        index.add_worker(url)
        index.on_snapshot(url, Snapshot("e", 0, 16, kv_events.SEED, kv_events.prefix_hashes(held or [], 16)))
    return index


def test_an_announced_request_counts_as_queued_until_the_engine_queues_it():
    index = live_index(W)
    ids = PROMPT + [1]
    assert index.matched_tokens([W], ids, queued=True) == {W: 0}
    assert index.peer_routed(W, HASHES, ttl=2.0)
    assert index.matched_tokens([W], ids, queued=True) == {W: 64}
    assert index.matched_tokens([W], ids) == {W: 0}  # held: nothing yet
    assert index.resident_tokens(W) == 64
    # A snapshot replaces what the engine reported, not what peers announced.
    index.on_snapshot(W, Snapshot("e", 0, 16, kv_events.SEED, []))
    assert index.matched_tokens([W], ids, queued=True) == {W: 64}
    # The engine reports the request queued: the engine's entry takes over, then it settles.
    index.on_message(W, EventBatch("e", 1, 0.0, [kv_events.queued("r1", HASHES)]))
    assert not index.workers[W].routed
    index.on_message(W, EventBatch("e", 2, 0.0, [kv_events.settled(["r1"])]))
    assert index.matched_tokens([W], ids, queued=True) == {W: 0}
    assert not index.workers[W].queued_blocks


def test_announcements_expire_and_are_skipped_when_the_worker_already_has_the_prompt():
    index = live_index(W, "http://w1:1", held=PROMPT[:32])
    t0 = time.monotonic()
    assert index.peer_routed(W, HASHES, ttl=2.0, now=t0)
    assert not index.peer_routed(W, HASHES, ttl=2.0, now=t0)  # already counted once
    assert not index.peer_routed(W, HASHES[:2], ttl=2.0, now=t0)  # held
    assert not index.peer_routed("http://unknown:1", HASHES, ttl=2.0, now=t0)  # not followed
    index.expire_routed(t0 + 1.9)
    assert index.matched_tokens([W], PROMPT + [1], queued=True)[W] == 64
    index.expire_routed(t0 + 2.0)
    assert index.matched_tokens([W], PROMPT + [1], queued=True)[W] == 32
    assert not index.workers[W].routed and not index.workers[W].queued_blocks
    # The engine queued it first: a late announcement adds nothing, and leaves nothing behind.
    index.on_message("http://w1:1", EventBatch("e", 1, 0.0, [kv_events.queued("r1", HASHES)]))
    assert not index.peer_routed("http://w1:1", HASHES, ttl=2.0)
    index.on_message("http://w1:1", EventBatch("e", 2, 0.0, [kv_events.settled(["r1"])]))
    assert not index.workers["http://w1:1"].queued_blocks


def test_an_expired_announcement_does_not_end_a_newer_one_of_the_same_prompt():
    index = live_index(W)
    index.peer_routed(W, HASHES, ttl=1.0, now=100.0)
    index.on_message(W, EventBatch("e", 1, 0.0, [kv_events.queued("r1", HASHES)]))
    index.on_message(W, EventBatch("e", 2, 0.0, [kv_events.settled(["r1"])]))  # aborted before its prefill
    index.peer_routed(W, HASHES, ttl=1.0, now=100.5)
    index.expire_routed(101.0)  # the first one's deadline
    assert index.matched_tokens([W], PROMPT + [1], queued=True)[W] == 64
    index.expire_routed(101.5)
    assert index.matched_tokens([W], PROMPT + [1], queued=True)[W] == 0


def fleet(tok: str, peer_port: int, peers: tuple[str, ...]) -> tuple[PrecisePolicy, list[Worker], PeerRoutes]:
    config = RouterConfig(policy="precise", tokenizer_path=tok, peer_port=peer_port, peers=peers)
    policy = make_policy(config)
    assert isinstance(policy, PrecisePolicy)
    workers = [Worker(f"http://w{i}:1", CircuitBreaker(2, 1.0)) for i in range(3)]
    for w in workers:
        policy.add_worker(w.url)
        policy.index.add_worker(w.url)
        policy.index.on_snapshot(w.url, Snapshot("e", 0, 16, kv_events.SEED, []))
    peers = PeerRoutes(config, policy.index, RouterMetrics("precise", lambda: workers, dict))
    policy.peers, policy.sync_events = peers, peers.drain
    return policy, workers, peers


def key(ids: list[int]) -> PromptKey:
    k = PromptKey(" ".join(map(str, ids)))
    k.ids = ids
    return k


def counted(peers: PeerRoutes, outcome: str) -> float:
    return peers.metrics.registry.get_sample_value("radixfleet_router_peer_routes_total", {"outcome": outcome}) or 0.0


def test_two_replicas_predict_each_others_burst_over_real_sockets(model_dir):
    """Replica A routes a request on a new prompt; replica B, routing a request sharing it a
    moment later (before any engine event), sends it to the same worker predicting the whole
    shared prefix cached, as the engine will report it. Each replica ignores its own announcements, which it hears
    back through the peer list naming every replica."""
    port_a, port_b = free_port(), free_port()
    everyone = (f"tcp://127.0.0.1:{port_a}", f"dns://localhost:{port_b}")

    async def scenario():
        (a, ws_a, peers_a), (b, ws_b, peers_b) = fleet(model_dir, port_a, everyone), fleet(model_dir, port_b, everyone)
        await peers_a.start()
        await peers_b.start()
        assert f"tcp://127.0.0.1:{port_b}" in peers_b.connected  # dns:// resolved
        try:
            await asyncio.sleep(0.3)  # the subscriptions reach the publishers
            first = key(PROMPT + [1])
            w, _ = a.select(ws_a, first)
            assert first.predicted == 0
            deadline = time.monotonic() + 5
            while not counted(peers_b, "applied") and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            second = key(PROMPT + [2])
            chosen, decision = b.select(ws_b, second)
            assert (chosen.url, decision, second.predicted) == (w.url, "cached", 64)
            assert counted(peers_b, "applied") == 1
            # A hears B's announcement, and its own (through the list) is ignored. Both prompts
            # have the same whole blocks, and A counts its own request on them (its ordering step,
            # --peer-hold), which came first: B's is known.
            while not counted(peers_a, "known") and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.1)
            peers_a.drain()
            assert counted(peers_a, "applied") == 0 and counted(peers_a, "known") == 1
            assert counted(peers_b, "applied") == 1 and counted(peers_b, "known") == 0
            assert list(a.index.workers[w.url].routed) == [kv_events.prefix_hashes(second.ids[:-1], 16)[-1]]
        finally:
            await peers_a.close()
            await peers_b.close()

    asyncio.run(scenario())


async def until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_replicas_routing_one_new_prompt_at_the_same_moment_agree_on_the_order(model_dir):
    """A and B route requests sharing a new prompt before either hears the other: both pick
    one worker and predict nothing cached. Before sending, each waits ``peer_hold`` for the
    other's announcement; the later one (by time) then predicts the shared blocks cached and
    is held until the engine reports the earlier one queued, so the engine serves them in
    that order, as both predicted. A replica with no live peer does not wait."""
    port_a, port_b = free_port(), free_port()
    everyone = (f"tcp://127.0.0.1:{port_a}", f"tcp://127.0.0.1:{port_b}")

    async def scenario():
        (a, ws_a, peers_a), (b, ws_b, peers_b) = fleet(model_dir, port_a, everyone), fleet(model_dir, port_b, everyone)
        peers_a.hold = peers_b.hold = 0.05  # room for a loaded test machine
        await peers_a.start()
        await peers_b.start()
        try:
            await until(lambda: peers_a.alive() and peers_b.alive())
            first, second = key(PROMPT + [1]), key(PROMPT + [2])
            w, _ = a.select(ws_a, first)
            b.sync_events = lambda: None  # B routes before it reads A's announcement
            chosen, decision = b.select(ws_b, second)
            b.sync_events = peers_b.drain
            assert (chosen.url, decision, first.predicted, second.predicted) == (w.url, "uncached", 0, 0)
            assert first.announced[0] < second.announced[0]
            engine_queued = EventBatch("e", 1, 0.0, [kv_events.queued("r1", HASHES)])

            async def engine_reports_the_first_queued():
                await asyncio.sleep(0.08)
                b.index.on_message(w.url, engine_queued)

            t0 = time.monotonic()
            sends = asyncio.gather(a.before_send(w, first), b.before_send(chosen, second))
            reported = asyncio.create_task(engine_reports_the_first_queued())
            await asyncio.wait_for(asyncio.shield(sends), 1.0)
            took = time.monotonic() - t0
            await reported
            assert (first.predicted, first.uncached) == (0, 65)
            assert (second.predicted, second.uncached) == (64, 1)
            assert 0.08 <= took < 0.5, took  # B went once the engine had queued A's request
            # Alone (its peer gone quiet), a replica does not hold a new prompt back.
            peers_a.heard.clear()
            third = key([7] * 40)
            w3, _ = a.select(ws_a, third)
            t0 = time.monotonic()
            await a.before_send(w3, third)
            assert time.monotonic() - t0 < 0.04
        finally:
            await peers_a.close()
            await peers_b.close()

    asyncio.run(scenario())


def test_a_later_request_through_the_same_replica_does_not_overtake_a_held_one(model_dir):
    """One replica routes two requests sharing a new prompt, one after the other. The first
    (no worker held the prompt) waits ``peer_hold`` for concurrent announcements; the second
    (the first's blocks counted ahead) is not held, and before this fix it went at once and
    reached the engine first, which served it uncached and the first from its prefill: both
    predictions wrong. Now it is ordered like a peer's request: sent once the engine has
    reported the first queued."""
    port_a, port_b = free_port(), free_port()
    everyone = (f"tcp://127.0.0.1:{port_a}", f"tcp://127.0.0.1:{port_b}")

    async def scenario():
        (a, ws_a, peers_a), (_, _, peers_b) = fleet(model_dir, port_a, everyone), fleet(model_dir, port_b, everyone)
        peers_a.hold = 0.05
        await peers_a.start()
        await peers_b.start()
        try:
            await until(peers_a.alive)
            first, second = key(PROMPT + [1]), key(PROMPT + [2])
            w, _ = a.select(ws_a, first)
            chosen, decision = a.select(ws_a, second)
            assert (chosen.url, decision, first.predicted, second.predicted) == (w.url, "cached", 0, 64)
            finished: dict[str, float] = {}

            async def send(name: str, k: PromptKey) -> None:
                await a.before_send(w, k)
                finished[name] = time.monotonic()

            t0 = time.monotonic()
            sends = asyncio.gather(send("first", first), send("second", second))
            await asyncio.sleep(0.12)  # the engine reports the first queued 0.12 s in
            queued_at = time.monotonic()
            a.index.on_message(w.url, EventBatch("e", 1, 0.0, [kv_events.queued("r1", HASHES + [first.announced[1][-1]])]))
            await asyncio.wait_for(sends, 1.0)
            assert finished["first"] - t0 < 0.11  # held 0.05 s, nothing before it
            assert finished["second"] >= queued_at, (finished, queued_at)
            assert (first.predicted, second.predicted) == (0, 64)
        finally:
            await peers_a.close()
            await peers_b.close()

    asyncio.run(scenario())


def test_bad_announcements_are_counted_and_dropped(model_dir):
    port = free_port()

    async def scenario():
        _, _, listener = fleet(model_dir, 0, (f"tcp://127.0.0.1:{port}",))
        ctx = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        pub.bind(f"tcp://127.0.0.1:{port}")
        await listener.start()
        try:
            await asyncio.sleep(0.3)
            for payload in (b"not json", b'{"router": "x", "worker": "http://w0:1", "hashes": ["a"]}', b'{"router": "x"}'):
                pub.send_multipart([TOPIC, payload])
            pub.send_multipart([TOPIC, f'{{"router": "x", "worker": "{W}", "hashes": {HASHES}}}'.encode()])
            deadline = time.monotonic() + 5
            while counted(listener, "applied") < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            listener.drain()
            assert counted(listener, "invalid") == 3 and counted(listener, "applied") == 1
        finally:
            await listener.close()
            pub.close(0)
            ctx.term()

    asyncio.run(scenario())


def test_peer_settings_are_validated():
    with pytest.raises(ValueError, match="need policy auto or precise"):
        RouterConfig(policy="cache_aware", peer_port=5558)
    with pytest.raises(ValueError, match="is not tcp://host:port or dns://name:port"):
        RouterConfig(peers=("http://router:5558",))
    with pytest.raises(ValueError, match="is not tcp://host:port or dns://name:port"):
        RouterConfig(peers=("tcp://router",))
    with pytest.raises(ValueError, match="peer_port must be in 0..65535"):
        RouterConfig(peer_port=70000)
    port = free_port()
    taken = PeerRoutes(RouterConfig(peer_port=port), KVIndex(), RouterMetrics("auto", list, dict))
    try:
        with pytest.raises(OSError, match=f"cannot listen for router peers on 127.0.0.1:{port}"):
            PeerRoutes(RouterConfig(peer_port=port), KVIndex(), RouterMetrics("auto", list, dict))
    finally:
        asyncio.run(taken.close())
