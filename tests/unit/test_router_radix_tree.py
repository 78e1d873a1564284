"""The approximate radix tree: insert/match/evict and concurrent use."""

from __future__ import annotations

import random
import threading
import time

from radixfleet.router.policies.radix_tree import RadixTree


def test_match_counts_shared_prefix_characters():
    tree = RadixTree()
    tree.insert("hello world")
    assert tree.match("hello world") == 11
    assert tree.match("hello there") == 6
    assert tree.match("goodbye") == 0
    assert tree.match("") == 0
    assert tree.match("hello world and more") == 11


def test_insert_splits_edges_and_size_counts_characters():
    tree = RadixTree()
    tree.insert("abcdef")
    tree.insert("abcxyz")
    tree.insert("abcdef")  # already present: no growth
    assert tree.size == len("abcdef") + len("xyz")
    assert tree.match("abcx") == 4
    assert tree.match("abcdeq") == 5
    tree.insert("ab")  # a prefix of existing text adds nothing
    assert tree.size == 9


def test_match_agrees_with_brute_force():
    rng = random.Random(0)
    texts = ["".join(rng.choice("ab") for _ in range(rng.randint(0, 12))) for _ in range(200)]
    tree = RadixTree()
    for t in texts[:100]:
        tree.insert(t)
    for q in texts[100:]:
        expected = max(len(_common(q, t)) for t in texts[:100])
        assert tree.match(q) == expected, q


def _common(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def test_evict_drops_least_recently_used_first():
    tree = RadixTree()
    tree.insert("old-" + "o" * 100)
    time.sleep(0.01)
    tree.insert("new-" + "n" * 100)
    freed = tree.evict(max_size=150)
    assert freed > 0 and tree.size <= 150
    assert tree.match("new-" + "n" * 100) == 104
    assert tree.match("old-" + "o" * 100) < 104


def test_evict_to_zero_empties_tree_and_keeps_it_usable():
    tree = RadixTree()
    for i in range(50):
        tree.insert(f"prompt {i} " * 3)
    tree.evict(0)
    assert tree.size == 0 and tree.match("prompt 1") == 0
    tree.insert("again")
    assert tree.match("again") == 5


def test_evict_below_limit_is_a_no_op():
    tree = RadixTree()
    tree.insert("abc")
    assert tree.evict(10) == 0 and tree.size == 3


def test_concurrent_inserts_matches_and_evictions_keep_size_consistent():
    tree = RadixTree()
    errors: list[BaseException] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(2000):
                t = f"group{rng.randint(0, 20)} " + "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
                tree.insert(t)
                tree.match(t)
                if rng.random() < 0.01:
                    tree.evict(500)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stored = sum(len(n.edge) for n in tree._iter_nodes())
    assert stored == tree.size
