"""Radix tree over token ids whose nodes own KV-cache slots.

Invariants:
- A node's ``key`` (token ids) and ``value`` (KV slots) have equal length, a multiple of
  ``page_size``; the path from the root spells a cached token prefix.
- ``lock_ref > 0`` on a node (and, by construction, on all its ancestors) while a running
  request uses that path: locked nodes are never evicted.
- ``evictable_size`` counts slots in unlocked nodes, ``protected_size`` in locked ones.
- With KV events on (``events``) and someone subscribed (``events.active``), a node's
  ``blocks`` are the hashes of the event blocks (``radixfleet/kv_events.py``) whose last
  token lies in it: blocks ``start // B`` to ``(start + len(key)) // B - 1`` of its path,
  ``start`` being the path length above it. Creating a node publishes them as stored,
  evicting it as removed, a flush as cleared; splitting a node moves blocks between its
  halves and publishes nothing. While nobody subscribes nothing is hashed or published (new
  nodes have no ``blocks``); ``hash_all`` restores the invariant for the whole tree when a
  subscriber arrives or a snapshot is asked for.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from radixfleet import kv_events
from radixfleet.engine.memory.allocator import TokenSlotAllocator

_counter = itertools.count()


@dataclass(eq=False)
class TreeNode:
    key: list[int] = field(default_factory=list)
    value: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    parent: TreeNode | None = None
    children: dict[tuple[int, ...], TreeNode] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: float = field(default_factory=time.monotonic)
    id: int = field(default_factory=lambda: next(_counter))
    start: int = 0  # tokens on the path above this node
    blocks: list[int] = field(default_factory=list)  # event block hashes (KV events on)

    def __lt__(self, other: TreeNode) -> bool:
        return self.last_access < other.last_access


@dataclass
class MatchResult:
    indices: torch.Tensor  # [matched_len] int64 KV slots of the matched prefix
    last_node: TreeNode  # lock this while the prefix is in use


class BlockEventSink(Protocol):
    """Where the cache's block changes go (``engine/managers/kv_publisher.py``)."""

    block_size: int
    seed: int
    active: bool  # someone subscribes: hash and publish; else the cache skips both

    def publish(self, events: list[dict]) -> None: ...


class RadixCache:
    def __init__(self, allocator: TokenSlotAllocator, page_size: int = 1, disabled: bool = False,
                 events: BlockEventSink | None = None):
        self.allocator = allocator
        self.page_size = page_size
        self.disabled = disabled
        self.events = None if disabled else events
        self.reset()

    def reset(self) -> None:
        self.root = TreeNode()
        self.root.lock_ref = 1  # the root is never evicted
        self.evictable_size = 0
        self.protected_size = 0

    # ---- helpers -------------------------------------------------------------------
    def _child_key(self, key: list[int]) -> tuple[int, ...]:
        return tuple(key[: self.page_size])

    def _match_len(self, a: list[int], b: list[int]) -> int:
        n = min(len(a), len(b))
        if a[:n] == b[:n]:  # the common case (a whole node matches), compared in C
            return n - n % self.page_size
        i = 0
        while a[i] == b[i]:
            i += 1
        return i - i % self.page_size

    def _split(self, node: TreeNode, at: int) -> TreeNode:
        """Split ``node`` so that a new parent holds its first ``at`` tokens; return it."""
        new = TreeNode(key=node.key[:at], value=node.value[:at], parent=node.parent,
                       lock_ref=node.lock_ref, last_access=node.last_access, start=node.start)
        if node.blocks:
            assert self.events is not None
            b = self.events.block_size
            cut = (node.start + at) // b - node.start // b
            new.blocks, node.blocks = node.blocks[:cut], node.blocks[cut:]
        node.start += at
        new.children = {self._child_key(node.key[at:]): node}
        assert node.parent is not None
        node.parent.children[self._child_key(new.key)] = new
        node.parent = new
        node.key, node.value = node.key[at:], node.value[at:]
        return new

    # ---- verbs ---------------------------------------------------------------------
    def match_prefix(self, key: list[int]) -> MatchResult:
        """Longest cached prefix of ``key`` (page-aligned)."""
        if self.disabled:
            return MatchResult(torch.empty(0, dtype=torch.int64), self.root)
        key = key[: len(key) - len(key) % self.page_size]
        node, values, now = self.root, [], time.monotonic()
        while key:
            child = node.children.get(self._child_key(key))
            if child is None:
                break
            child.last_access = now
            n = self._match_len(child.key, key)
            if n < len(child.key):
                child = self._split(child, n)
            values.append(child.value)
            node, key = child, key[n:]
        indices = torch.cat(values) if values else torch.empty(0, dtype=torch.int64)
        return MatchResult(indices, node)

    def insert(self, key: list[int], value: torch.Tensor) -> int:
        """Insert ``key`` with its slots; return how many leading tokens were already cached.

        The caller owns ``value`` and must free the slots of the already-cached part that it
        does not share with the tree (the tree keeps its own copy of those slots).
        """
        assert len(key) == len(value), "one KV slot per token"
        if self.disabled:
            return 0
        aligned = len(key) - len(key) % self.page_size
        key, value = key[:aligned], value[:aligned]
        full = key
        node, prefix, now = self.root, 0, time.monotonic()
        while key:
            child = node.children.get(self._child_key(key))
            if child is None:
                new = TreeNode(key=list(key), value=value.clone(), parent=node, last_access=now, start=prefix)
                node.children[self._child_key(key)] = new
                self.evictable_size += len(key)
                if self.events is not None and self.events.active:
                    self._publish_stored(new, full)
                return prefix
            child.last_access = now
            n = self._match_len(child.key, key)
            if n < len(child.key):
                child = self._split(child, n)
            prefix += n
            node, key, value = child, key[n:], value[n:]
        return prefix

    def lock(self, node: TreeNode) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def unlock(self, node: TreeNode) -> None:
        while node is not self.root:
            assert node.lock_ref > 0, "unlock without a matching lock"
            if node.lock_ref == 1:
                self.evictable_size += len(node.key)
                self.protected_size -= len(node.key)
            node.lock_ref -= 1
            node = node.parent  # type: ignore[assignment]

    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` slots from least-recently-used unlocked leaves."""
        leaves = [n for n in self._nodes() if not n.children and n.lock_ref == 0]
        heapq.heapify(leaves)
        freed, gone = 0, []
        while freed < num_tokens and leaves:
            leaf = heapq.heappop(leaves)
            parent = leaf.parent
            assert parent is not None
            self.allocator.free(leaf.value)
            gone += leaf.blocks
            freed += len(leaf.key)
            self.evictable_size -= len(leaf.key)
            del parent.children[self._child_key(leaf.key)]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)
        if gone and self.events is not None and self.events.active:
            self.events.publish([kv_events.removed(gone)])
        return freed

    def flush(self) -> bool:
        """Drop every cached prefix; refused (False) while requests hold locks."""
        if self.protected_size > 0:
            return False
        for node in self._nodes():
            self.allocator.free(node.value)
        self.reset()
        if self.events is not None and self.events.active:
            self.events.publish([kv_events.cleared()])
        return True

    def resident_blocks(self) -> list[int]:
        """Every event block hash the tree holds (for a KV-events snapshot; current while
        ``events.active``, else after ``hash_all``)."""
        return [h for node in self._nodes() for h in node.blocks]

    def hash_all(self) -> int:
        """Recompute every node's ``blocks`` from the root (nodes created while nobody
        subscribed have none); returns the number of blocks. One blake2b per resident block."""
        assert self.events is not None, "hash_all needs KV events on"
        b, total = self.events.block_size, 0
        # (node, the path's tokens above it after its last whole block, that block's hash)
        stack = [(child, [], self.events.seed) for child in self.root.children.values()]
        while stack:
            node, carry, parent = stack.pop()
            assert len(carry) == node.start % b
            data = carry + node.key
            full = len(data) // b
            node.blocks = kv_events.chain_hashes(data, b, 0, full, parent)
            total += full
            tail = node.blocks[-1] if node.blocks else parent
            stack.extend((child, data[full * b:], tail) for child in node.children.values())
        return total

    def _publish_stored(self, node: TreeNode, path: list[int]) -> None:
        """Hash and publish the blocks whose last token lies in the new leaf ``node``
        (``path``: the tokens from the root to the end of ``node``)."""
        assert self.events is not None
        b = self.events.block_size
        first, last = node.start // b, (node.start + len(node.key)) // b
        if first == last:
            return
        parent = None
        if first:
            up = node.parent
            while up is not None and not up.blocks:
                up = up.parent
            assert up is not None, "the blocks before a node lie in its ancestors"
            parent = up.blocks[-1]
        node.blocks = kv_events.chain_hashes(path, b, first, last, self.events.seed if parent is None else parent)
        self.events.publish([kv_events.stored(node.blocks, parent)])

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size
