"""Decides which tokens of which sequences run in the next step (continuous batching).

Each step has a token budget. Running sequences go first, oldest first: a decoding sequence
adds one token, a sequence in chunked prefill adds the next chunk. Waiting sequences then
join while budget, blocks and the sequence limit allow; a long prompt is split into chunks.
When a running sequence needs a block and none is free, the newest running sequence is
preempted: its blocks are freed and it is recomputed later from its tokens, which gives the
same output because sampling depends only on (seed, position).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pdserve.engine.kv_pool import BlockPool
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
        self, pool: BlockPool, block_size: int, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        self.pool = pool
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Adds a sequence whose KV is already in its blocks (computed elsewhere)."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

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
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_uncomputed, budget)
            need = self.blocks_needed(seq.num_computed + n) - len(seq.block_ids)
            if need > self.pool.num_free:
                break
            seq.block_ids += self.pool.allocate(need)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        scheduled.sort(key=lambda s: s.num_tokens != 1)
        return scheduled

    def _grow(self, seq: Sequence, n: int) -> bool:
        """Gives `seq` blocks for `n` more tokens, preempting the newest running sequences
        until enough are free. False if `seq` itself, being the newest, was preempted."""
        need = self.blocks_needed(seq.num_computed + n) - len(seq.block_ids)
        while need > self.pool.num_free:
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        seq.block_ids += self.pool.allocate(need)
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Ends a sequence wherever it is and frees its blocks at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED

    def _release(self, seq: Sequence) -> None:
        self.pool.free(seq.block_ids)
        seq.block_ids = []
