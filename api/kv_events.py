"""KV events: how workers tell the router which blocks they hold (msgpack on the wire).

A worker publishes `KVEventBatch`es in order, numbered `seq = 1, 2, ...` within its `epoch`
(a new epoch on every start of the worker process). The router applies them in order; on a
gap or a new epoch it asks the worker for a `KVSnapshot` and replaces what it knew, then
applies the batches numbered after the snapshot's `seq`.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

# A worker's engine thread publishes a batch at least this often, an empty one when nothing
# changed: a worker whose events stop for much longer (`supervision.stall_timeout_s`) is stuck.
HEARTBEAT_S = 1.0

_STORED, _REMOVED = 1, 2


@dataclass(frozen=True)
class BlockStored:
    """The worker's prefix cache now holds `block_hash`, a child of `parent_hash` (None for a
    prompt's first block)."""

    block_hash: int
    parent_hash: int | None


@dataclass(frozen=True)
class BlockRemoved:
    block_hash: int


KVEvent = BlockStored | BlockRemoved


@dataclass(frozen=True)
class WorkerLoad:
    """What the placement policy reads of a worker, as of the batch that carries it."""

    running: int
    waiting: int
    free_blocks: int
    total_blocks: int


@dataclass(frozen=True)
class KVEventBatch:
    worker_id: str
    epoch: int
    seq: int
    events: tuple[KVEvent, ...]
    load: WorkerLoad


@dataclass(frozen=True)
class KVSnapshot:
    """Every block a worker holds, parents before children, as of batch `seq` of `epoch`."""

    worker_id: str
    epoch: int
    seq: int
    blocks: tuple[BlockStored, ...]
    load: WorkerLoad


def _load(load: WorkerLoad) -> list[int]:
    return [load.running, load.waiting, load.free_blocks, load.total_blocks]


def encode_batch(batch: KVEventBatch) -> bytes:
    events = [
        [_STORED, e.block_hash, e.parent_hash]
        if isinstance(e, BlockStored)
        else [_REMOVED, e.block_hash]
        for e in batch.events
    ]
    return msgpack.packb([batch.worker_id, batch.epoch, batch.seq, events, _load(batch.load)])


def decode_batch(data: bytes) -> KVEventBatch:
    worker_id, epoch, seq, raw, load = msgpack.unpackb(data)
    events = tuple(BlockStored(e[1], e[2]) if e[0] == _STORED else BlockRemoved(e[1]) for e in raw)
    return KVEventBatch(worker_id, epoch, seq, events, WorkerLoad(*load))


def encode_snapshot(snapshot: KVSnapshot) -> bytes:
    blocks = [[b.block_hash, b.parent_hash] for b in snapshot.blocks]
    return msgpack.packb(
        [snapshot.worker_id, snapshot.epoch, snapshot.seq, blocks, _load(snapshot.load)]
    )


def decode_snapshot(data: bytes) -> KVSnapshot:
    worker_id, epoch, seq, raw, load = msgpack.unpackb(data)
    blocks = tuple(BlockStored(h, p) for h, p in raw)
    return KVSnapshot(worker_id, epoch, seq, blocks, WorkerLoad(*load))
