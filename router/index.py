"""The global radix index: which worker holds which KV blocks, from the workers' KV events.

Every block hash names a whole prefix (`pdserve.api.block_hash`), so the index is a flat map
from block hash to the set of workers holding it, kept as a bitmask (one bit per worker).
`match` walks a prompt's hash chain once and notes where each worker's bit drops out: its
cost grows with the prompt's blocks, not with the number of workers or indexed blocks. Being
keyed by block hash alone, the map can later be sharded by hash range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.api.kv_events import BlockStored, KVEventBatch, KVSnapshot, WorkerLoad


@dataclass(frozen=True)
class _Position:
    """The last batch of a worker that the index reflects."""

    epoch: int
    seq: int


class RadixIndex:
    """Applies each worker's KV event batches in order and answers prefix matches.

    NOTE: radix trees evict leaves only, so a worker that holds h_k holds h_0..h_{k-1}; the
    index relies on it only for speed (a match stops at a worker's first missing block).
    """

    def __init__(self) -> None:
        self._holders: dict[int, int] = {}  # block hash -> bitmask of worker slots
        self._bit: dict[str, int] = {}  # worker id -> its slot's bit
        self._worker_of_bit: dict[int, str] = {}
        self._blocks: dict[str, set[int]] = {}  # worker id -> hashes it holds
        self._position: dict[str, _Position] = {}
        self.loads: dict[str, WorkerLoad] = {}

    def __len__(self) -> int:
        """Indexed (block, worker) pairs."""
        return sum(len(blocks) for blocks in self._blocks.values())

    def apply(self, batch: KVEventBatch) -> bool:
        """Applies `batch` if it is the next of its worker's epoch, or drops it if the index
        already reflects it. Returns False (applying nothing) on a gap or an epoch the index
        has not seen: the caller then loads a snapshot with `resync`."""
        position = self._position.get(batch.worker_id)
        if position is None or batch.epoch != position.epoch or batch.seq > position.seq + 1:
            return False
        if batch.seq <= position.seq:
            return True
        bit = self._bit[batch.worker_id]
        blocks = self._blocks[batch.worker_id]
        for event in batch.events:
            if isinstance(event, BlockStored):
                self._add(event.block_hash, bit, blocks)
            else:
                self._discard(event.block_hash, bit, blocks)
        self._position[batch.worker_id] = _Position(batch.epoch, batch.seq)
        self.loads[batch.worker_id] = batch.load
        return True

    def resync(self, snapshot: KVSnapshot) -> None:
        """Replaces all the index knew of the snapshot's worker with the snapshot."""
        worker_id = snapshot.worker_id
        self.remove_worker(worker_id)
        bit = self._take_bit(worker_id)
        blocks = self._blocks[worker_id] = set()
        for block in snapshot.blocks:
            self._add(block.block_hash, bit, blocks)
        self._position[worker_id] = _Position(snapshot.epoch, snapshot.seq)
        self.loads[worker_id] = snapshot.load

    def remove_worker(self, worker_id: str) -> None:
        """Forgets a worker (lost, or about to be resynced): its blocks, load and position."""
        bit = self._bit.pop(worker_id, None)
        if bit is None:
            return
        del self._worker_of_bit[bit]
        for block_hash in self._blocks.pop(worker_id):
            self._clear(block_hash, bit)
        self._position.pop(worker_id, None)
        self.loads.pop(worker_id, None)

    def blocks_of(self, worker_id: str) -> set[int]:
        """The block hashes the index believes `worker_id` holds."""
        return set(self._blocks.get(worker_id, ()))

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """For every worker holding the prompt's first block: how many leading blocks of
        `hashes` it holds."""
        counts: dict[str, int] = {}
        get = self._holders.get
        alive = get(hashes[0], 0) if hashes else 0
        for i, block_hash in enumerate(hashes):
            if not alive:
                break
            still = alive & get(block_hash, 0)
            if still != alive:
                self._note(alive ^ still, i, counts)
                alive = still
        if alive:
            self._note(alive, len(hashes), counts)
        return counts

    def _note(self, mask: int, count: int, counts: dict[str, int]) -> None:
        while mask:
            low = mask & -mask
            counts[self._worker_of_bit[low]] = count
            mask ^= low

    def _take_bit(self, worker_id: str) -> int:
        bit = 1
        while bit in self._worker_of_bit:
            bit <<= 1
        self._bit[worker_id] = bit
        self._worker_of_bit[bit] = worker_id
        return bit

    def _add(self, block_hash: int, bit: int, blocks: set[int]) -> None:
        if block_hash not in blocks:
            blocks.add(block_hash)
            self._holders[block_hash] = self._holders.get(block_hash, 0) | bit

    def _discard(self, block_hash: int, bit: int, blocks: set[int]) -> None:
        if block_hash in blocks:
            blocks.discard(block_hash)
            self._clear(block_hash, bit)

    def _clear(self, block_hash: int, bit: int) -> None:
        mask = self._holders[block_hash] & ~bit
        if mask:
            self._holders[block_hash] = mask
        else:
            del self._holders[block_hash]
