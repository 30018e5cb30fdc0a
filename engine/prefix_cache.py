"""The prefix cache: a radix tree over block hashes that owns the KV blocks it caches.

Each node is one full block, named by its chained hash (`api/block_hash.py`), so a node's path
from the root is the token prefix it caches. The tree holds one pool reference per node; a
sequence that reuses or contributes blocks *locks* its deepest node, which pins the whole path.
Unlocked nodes are evictable, leaves first, least recently used first, and only when the pool
runs short. The block pool never learns about prefixes.

Every change is recorded as a KV event (stored / removed) for the router's global index.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.api.kv_events import BlockRemoved, BlockStored, KVEvent
from pdserve.engine.kv_pool import BlockPool


@dataclass(eq=False)
class Node:
    block_hash: int
    block: int
    parent: Node | None
    children: dict[int, Node] = field(default_factory=dict)
    lock: int = 0
    last_used: int = 0


class PrefixCache:
    def __init__(self, pool: BlockPool) -> None:
        self._pool = pool
        self._nodes: dict[int, Node] = {}
        self._roots: dict[int, Node] = {}
        self._clock = itertools.count(1)
        self._events: list[KVEvent] = []
        self.num_evictable = 0

    @property
    def num_blocks(self) -> int:
        return len(self._nodes)

    def match(self, hashes: Sequence[int]) -> list[Node]:
        """The longest cached chain of `hashes`, root first. Marks it recently used."""
        path: list[Node] = []
        children = self._roots
        now = next(self._clock)
        for h in hashes:
            node = children.get(h)
            if node is None:
                break
            node.last_used = now
            path.append(node)
            children = node.children
        return path

    def lock(self, node: Node | None) -> None:
        """Pins `node` and its ancestors against eviction (one count per holder)."""
        while node is not None:
            if node.lock == 0:
                self.num_evictable -= 1
            node.lock += 1
            node = node.parent

    def unlock(self, node: Node | None) -> None:
        while node is not None:
            node.lock -= 1
            if node.lock == 0:
                self.num_evictable += 1
            node = node.parent

    def extend(self, parent: Node | None, block_hash: int, block: int) -> Node:
        """Moves a holder's lock from `parent` to its child `block_hash`, caching `block` there
        if the tree lacks that hash (the tree takes its own reference). If another sequence
        cached the same prefix first, its node is kept and `block` stays the caller's alone."""
        children = self._roots if parent is None else parent.children
        node = children.get(block_hash)
        if node is None:
            node = Node(block_hash, block, parent)
            children[block_hash] = node
            self._nodes[block_hash] = node
            self._pool.incref([block])
            self._events.append(
                BlockStored(block_hash, parent.block_hash if parent is not None else None)
            )
        else:
            # NOTE: a hash collision between different prefixes is as likely as any 64-bit one
            # (~n^2 / 2^65); the chain makes an accidental match need a whole-prefix collision.
            if node.lock == 0:
                self.num_evictable -= 1
        node.lock += 1  # parent's count is unchanged: the lock moved down one level
        node.last_used = next(self._clock)
        return node

    def evict(self, num_blocks: int) -> int:
        """Frees up to `num_blocks` unlocked blocks, oldest leaves first; returns how many."""
        heap = [
            (n.last_used, id(n), n) for n in self._nodes.values() if not n.children and not n.lock
        ]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_blocks:
            _, _, node = heapq.heappop(heap)
            self._remove(node)
            freed += 1
            parent = node.parent
            if parent is not None and not parent.children and not parent.lock:
                heapq.heappush(heap, (parent.last_used, id(parent), parent))
        return freed

    def _remove(self, node: Node) -> None:
        siblings = self._roots if node.parent is None else node.parent.children
        del siblings[node.block_hash]
        del self._nodes[node.block_hash]
        self.num_evictable -= 1
        self._pool.free([node.block])
        self._events.append(BlockRemoved(node.block_hash))

    def drain_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def snapshot(self) -> list[BlockStored]:
        """Every cached block, parents before children."""
        out: list[BlockStored] = []
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            parent = node.parent.block_hash if node.parent is not None else None
            out.append(BlockStored(node.block_hash, parent))
            stack.extend(node.children.values())
        return out
