"""An approximate radix tree over request text (characters), one per worker.

It remembers which prompts were routed to a worker, so the cache-aware policy can guess
where a prefix is already cached without asking the worker. Verbs: ``insert``,
``match`` (longest common prefix, in characters), ``evict`` (LRU leaves first) and
``size`` (characters stored). Every public method takes the tree's lock, so one tree can
be shared between the event loop and an eviction thread.

Invariant: ``size`` equals the sum of the edge lengths of all nodes, and every node's
``last_access`` is >= that of each of its children (an insert touches the whole path), so
evicting the oldest leaf first never strands a newer descendant.
"""

from __future__ import annotations

import heapq
import threading
import time


class _Node:
    __slots__ = ("edge", "children", "parent", "last_access")

    def __init__(self, edge: str, parent: _Node | None, now: float) -> None:
        self.edge = edge
        self.children: dict[str, _Node] = {}  # keyed by the first character of the child's edge
        self.parent = parent
        self.last_access = now


def _common_prefix_len(edge: str, text: str, start: int) -> int:
    """Length of the common prefix of ``edge`` and ``text[start:]``."""
    if text.startswith(edge, start):
        return len(edge)
    # Binary search on C-level startswith: O(log n) comparisons instead of a Python char loop.
    lo, hi = 0, min(len(edge), len(text) - start)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text.startswith(edge[:mid], start):
            lo = mid
        else:
            hi = mid - 1
    return lo


class RadixTree:
    """Thread-safe character radix tree with LRU eviction."""

    def __init__(self) -> None:
        self._root = _Node("", None, time.monotonic())
        self._size = 0
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        """Characters stored in the tree."""
        return self._size

    def insert(self, text: str) -> None:
        """Add ``text`` and mark its whole path as just used."""
        now = time.monotonic()
        with self._lock:
            node, i = self._root, 0
            node.last_access = now
            while i < len(text):
                child = node.children.get(text[i])
                if child is None:
                    node.children[text[i]] = _Node(text[i:], node, now)
                    self._size += len(text) - i
                    return
                n = _common_prefix_len(child.edge, text, i)
                if n < len(child.edge):  # split the edge: node -> mid -> child
                    mid = _Node(child.edge[:n], node, now)
                    node.children[text[i]] = mid
                    child.edge = child.edge[n:]
                    child.parent = mid
                    mid.children[child.edge[0]] = child
                    child = mid
                child.last_access = now
                node, i = child, i + n

    def match(self, text: str) -> int:
        """Number of leading characters of ``text`` present in the tree (read-only)."""
        with self._lock:
            node, i = self._root, 0
            while i < len(text):
                child = node.children.get(text[i])
                if child is None:
                    break
                n = _common_prefix_len(child.edge, text, i)
                i += n
                if n < len(child.edge):
                    break
                node = child
            return i

    def evict(self, max_size: int) -> int:
        """Drop least-recently-used leaves until ``size <= max_size``; return characters freed."""
        with self._lock:
            if self._size <= max_size:
                return 0
            before = self._size
            leaves = [(n.last_access, id(n), n) for n in self._iter_nodes() if not n.children]
            heapq.heapify(leaves)
            while self._size > max_size and leaves:
                _, _, leaf = heapq.heappop(leaves)
                parent = leaf.parent
                assert parent is not None, "the root is never a leaf candidate"
                del parent.children[leaf.edge[0]]
                self._size -= len(leaf.edge)
                if parent is not self._root and not parent.children:
                    heapq.heappush(leaves, (parent.last_access, id(parent), parent))
            return before - self._size

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._root = _Node("", None, time.monotonic())
            self._size = 0

    def _iter_nodes(self):
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())
