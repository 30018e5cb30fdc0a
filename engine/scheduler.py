"""Decides which tokens of which sequences run in the next step (continuous batching), and owns
every KV block a sequence holds: computed, reused from the prefix cache, or reserved.

Each step has a token budget. Running sequences go first, oldest first: a decoding sequence
adds one token, a sequence in chunked prefill adds the next chunk. Waiting sequences then
join while budget, blocks and the sequence limit allow; a long prompt is split into chunks, and
a prompt starts after its longest cached prefix. When a running sequence needs a block and none
is free (nor evictable from the prefix cache), the newest running sequence is preempted: its
blocks are freed and it is recomputed later from its tokens, which gives the same output
because sampling depends only on (seed, position).

A *reserved* sequence holds blocks for KV that another worker is sending (and one more token's
worth, for the token it decodes first); it counts against the pool at once. Once its KV has
landed it is *ready*: it joins the running batch before any waiting sequence, as `max_num_seqs`
allows, and needs no new block to do so, so a pool full of ready sequences always moves.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pdserve.api.block_hash import block_hashes, blocks_for
from pdserve.api.errors import CapacityExceeded
from pdserve.api.kv_events import BlockStored, KVEvent
from pdserve.engine.kv_pool import BlockPool
from pdserve.engine.prefix_cache import PrefixCache
from pdserve.engine.sequence import Sequence, Status


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step computes the sequence's last known token, so its logits give
        the next token."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        cache_salt: int,
        enable_prefix_cache: bool = True,
    ) -> None:
        self.pool = pool
        self._cache = PrefixCache(pool)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.salt = cache_salt
        self.enable_prefix_cache = enable_prefix_cache
        self.waiting: deque[Sequence] = deque()
        self.ready: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_reserved = 0
        self.num_preemptions = 0

    @property
    def num_cached_blocks(self) -> int:
        return self._cache.num_blocks

    def drain_kv_events(self) -> list[KVEvent]:
        return self._cache.drain_events()

    def cached_blocks(self) -> list[BlockStored]:
        return self._cache.snapshot()

    @property
    def num_available_blocks(self) -> int:
        """Blocks that an allocation can get: free ones and unlocked cached ones."""
        return self.pool.num_free + self._cache.num_evictable

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def reserve(self, seq: Sequence) -> int:
        """Holds blocks for all of `seq`'s tokens, reusing its longest cached prefix; returns the
        number of leading tokens already cached (their KV need not be sent). Raises
        `CapacityExceeded` when the blocks are not there."""
        cached = self._match(seq, seq.num_tokens)
        need = self.blocks_needed(seq.num_tokens + 1) - len(seq.block_ids)
        if need > self.num_available_blocks:
            self._release(seq)
            raise CapacityExceeded(
                f"the request needs {need} more KV blocks; {self.num_available_blocks} are free"
            )
        seq.block_ids += self._allocate(need)
        seq.status = Status.RESERVED
        self.num_reserved += 1
        return cached

    def admit_reserved(self, seq: Sequence, num_computed: int) -> None:
        """The reserved KV of the first `num_computed` tokens has landed (and enters the prefix
        cache): the sequence is ready to join the running batch with its blocks."""
        self.num_reserved -= 1
        seq.num_computed = num_computed
        seq.status = Status.READY
        self.cache_computed(seq)
        self.ready.append(seq)

    def fall_back(self, seq: Sequence) -> None:
        """The reserved KV will not come: the sequence queues to be computed here, from its
        longest cached prefix."""
        self.num_reserved -= 1
        self._release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.ready or self.running)

    def blocks_needed(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    def schedule(self) -> list[ScheduledSeq]:
        """The next step's work, single-token (decode) sequences first."""
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if not self._grow(seq, n):
                break  # seq itself was preempted; everything after it is newer and went too
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1
        while self.ready and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.ready.popleft()  # its blocks hold every token it computes next
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, seq.num_uncomputed))
            budget -= seq.num_uncomputed
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            fresh = not seq.block_ids
            if fresh:
                # NOTE: at least the last token is computed, for its logits; and a cached block
                # is never written, so the match stops one token short of a full-prompt hit.
                seq.num_computed = self._match(seq, seq.num_tokens - 1)
            n = min(seq.num_uncomputed, budget)
            need = self.blocks_needed(seq.num_computed + n) - len(seq.block_ids)
            # NOTE: a prompt starts only once the pool holds all of it: started chunk by chunk
            # into a pool that cannot, it would be preempted and recomputed over and over while
            # it waits for the blocks (seen with a transfer holding most of a decode pool).
            whole = self.blocks_needed(seq.num_tokens) - len(seq.block_ids)
            if whole > self.num_available_blocks:
                if fresh:  # a waiting sequence must not pin cached blocks others could use
                    self._release(seq)
                    seq.num_computed = 0
                break
            seq.block_ids += self._allocate(need)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        scheduled.sort(key=lambda s: s.num_tokens != 1)
        return scheduled

    def cache_computed(self, seq: Sequence) -> None:
        """Offers `seq`'s newly computed full blocks to the prefix cache."""
        if not self.enable_prefix_cache:
            return
        full = seq.num_computed // self.block_size
        if full <= seq.cache_depth:
            return
        self._hash(seq, full)
        for i in range(seq.cache_depth, full):
            seq.cache_node = self._cache.extend(
                seq.cache_node, seq.block_hashes[i], seq.block_ids[i]
            )
        seq.cache_depth = full

    def _hash(self, seq: Sequence, num_blocks: int) -> None:
        """Extends `seq.block_hashes` to its first `num_blocks` blocks."""
        known = len(seq.block_hashes)
        if known < num_blocks:
            bs = self.block_size
            seq.block_hashes += block_hashes(
                seq.token_ids[known * bs : num_blocks * bs],
                bs,
                self.salt,
                seq.block_hashes[-1] if known else None,
            )

    def _match(self, seq: Sequence, max_tokens: int) -> int:
        """Gives a block-less `seq` the cached blocks of its longest cached prefix of at most
        `max_tokens` tokens; returns that prefix's length."""
        if not self.enable_prefix_cache:
            return 0
        self._hash(seq, max_tokens // self.block_size)
        path = self._cache.match(seq.block_hashes[: max_tokens // self.block_size])
        if not path:
            return 0
        blocks = [node.block for node in path]
        self.pool.incref(blocks)
        self._cache.lock(path[-1])
        seq.block_ids = blocks
        seq.cache_node, seq.cache_depth = path[-1], len(path)
        cached = len(path) * self.block_size
        if seq.num_cached_prompt_tokens is None:
            seq.num_cached_prompt_tokens = min(cached, seq.num_prompt_tokens)
        return cached

    def _allocate(self, n: int) -> list[int]:
        short = n - self.pool.num_free
        if short > 0:
            self._cache.evict(short)
        return self.pool.allocate(n)

    def _grow(self, seq: Sequence, n: int) -> bool:
        """Gives `seq` blocks for `n` more tokens, preempting the newest running sequences
        until enough are free. False if `seq` itself, being the newest, was preempted."""
        need = self.blocks_needed(seq.num_computed + n) - len(seq.block_ids)
        while need > self.num_available_blocks:
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        seq.block_ids += self._allocate(need)
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Ends a sequence wherever it is and frees its blocks at once (cached blocks stay in
        the prefix cache)."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status is Status.READY:
            self.ready.remove(seq)
        elif seq.status is Status.RESERVED:
            self.num_reserved -= 1
        self._release(seq)
        seq.status = Status.FINISHED

    def _release(self, seq: Sequence) -> None:
        if seq.block_ids:
            self.pool.free(seq.block_ids)
        self._cache.unlock(seq.cache_node)
        seq.block_ids = []
        seq.cache_node, seq.cache_depth = None, 0
