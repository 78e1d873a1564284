import torch

from radixfleet.engine.memory.allocator import TokenSlotAllocator
from radixfleet.engine.memory.radix_cache import RadixCache


def make(n=64, page=1, disabled=False):
    alloc = TokenSlotAllocator(n, page)
    return alloc, RadixCache(alloc, page, disabled)


def insert_seq(alloc, cache, tokens):
    slots = alloc.alloc(len(tokens))
    prefix = cache.insert(tokens, slots)
    alloc.free(slots[:prefix])  # duplicates of what the tree already held
    return slots


def test_match_returns_longest_cached_prefix_and_its_slots():
    alloc, cache = make()
    slots = insert_seq(alloc, cache, [1, 2, 3, 4])
    m = cache.match_prefix([1, 2, 3, 9, 9])
    assert m.indices.tolist() == slots[:3].tolist()
    assert cache.match_prefix([7]).indices.numel() == 0


def test_insert_reports_existing_prefix_and_splits_nodes():
    alloc, cache = make()
    insert_seq(alloc, cache, [1, 2, 3, 4])
    slots = alloc.alloc(3)
    assert cache.insert([1, 2, 5], slots) == 2
    assert cache.match_prefix([1, 2, 5]).indices[-1].item() == slots[2].item()
    assert cache.match_prefix([1, 2, 3, 4]).indices.numel() == 4
    assert cache.total_size == 5


def test_locked_paths_survive_eviction_and_lru_leaf_goes_first():
    alloc, cache = make()
    insert_seq(alloc, cache, [1, 2, 3])
    insert_seq(alloc, cache, [7, 8, 9])
    locked = cache.match_prefix([1, 2, 3])
    cache.lock(locked.last_node)
    assert cache.protected_size == 3 and cache.evictable_size == 3
    free_before = alloc.available
    assert cache.evict(100) == 3
    assert alloc.available == free_before + 3
    assert cache.match_prefix([1, 2, 3]).indices.numel() == 3
    assert cache.match_prefix([7, 8, 9]).indices.numel() == 0
    cache.unlock(locked.last_node)
    assert cache.evictable_size == 3 and cache.protected_size == 0


def test_evict_order_is_least_recently_used():
    alloc, cache = make()
    insert_seq(alloc, cache, [1, 1])
    insert_seq(alloc, cache, [2, 2])
    cache.match_prefix([1, 1])  # touch: [2, 2] is now the oldest
    cache.evict(1)
    assert cache.match_prefix([2, 2]).indices.numel() == 0
    assert cache.match_prefix([1, 1]).indices.numel() == 2


def test_flush_frees_everything_but_refuses_while_locked():
    alloc, cache = make()
    full = alloc.available
    insert_seq(alloc, cache, [1, 2, 3])
    m = cache.match_prefix([1, 2, 3])
    cache.lock(m.last_node)
    assert cache.flush() is False
    cache.unlock(m.last_node)
    assert cache.flush() is True
    assert alloc.available == full and cache.total_size == 0


def test_disabled_cache_matches_nothing():
    alloc, cache = make(disabled=True)
    assert cache.insert([1, 2], alloc.alloc(2)) == 0
    assert cache.match_prefix([1, 2]).indices.numel() == 0


def test_page_size_aligns_matches_to_whole_pages():
    alloc, cache = make(n=64, page=4)
    slots = alloc.alloc(6)
    cache.insert(list(range(6)), slots)
    assert cache.total_size == 4  # the partial page is not cached
    assert cache.match_prefix(list(range(6))).indices.tolist() == slots[:4].tolist()
    assert cache.match_prefix([0, 1, 2]).indices.numel() == 0


def test_allocator_refuses_when_short_and_never_hands_out_slot_zero():
    alloc = TokenSlotAllocator(8)
    got = alloc.alloc(7)
    assert got is not None and 0 not in got.tolist()
    assert alloc.alloc(1) is None
    alloc.free(got[:2])
    assert alloc.available == 2


def test_paged_allocator_returns_aligned_pages():
    alloc = TokenSlotAllocator(32, page_size=4)
    got = alloc.alloc(6)
    assert len(got) == 6 and got[0].item() % 4 == 0
    assert torch.equal(got[1:4] - got[0], torch.tensor([1, 2, 3]))
    assert alloc.available == 32 - 4 - 8
