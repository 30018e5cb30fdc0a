"""Publishes an engine's prefix-cache events and load to the router, in numbered batches.

Both worker kinds run one. Batches are numbered 1, 2, ... within an epoch that is new every time
the worker process starts, so the router can tell a gap (it missed batches) or a restart (new
epoch) and ask for a snapshot instead. If nobody consumes the batches, the oldest are dropped:
the consumer then sees a gap and resynchronises, which is cheaper than unbounded memory.

`publish` and `snapshot` run where the engine runs (its own thread on a decode worker);
`stream` runs on the event loop given to `attach`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import AsyncIterator

from pdserve.api.kv_events import (
    HEARTBEAT_S,
    KVEventBatch,
    KVSnapshot,
    WorkerLoad,
    encode_batch,
    encode_snapshot,
)
from pdserve.engine.llm_engine import LLMEngine

MAX_QUEUED_BATCHES = 1024
LOAD_INTERVAL_S = 0.05  # a batch with no events, only load, goes out at most this often


class EventPublisher:
    def __init__(self, worker_id: str, engine: LLMEngine) -> None:
        self.worker_id = worker_id
        self.epoch = random.getrandbits(63)
        self._engine = engine
        self._seq = 0
        self._queue: deque[bytes] = deque(maxlen=MAX_QUEUED_BATCHES)
        self._ready = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_load: WorkerLoad | None = None
        self._last_sent = 0.0

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def publish(self, idle: bool = False) -> None:
        """Sends the events since the last call, or the load alone when it changed and the
        last batch is old enough, or the worker goes `idle` (no later call would send it), or
        an empty batch as the heartbeat when nothing went out for `HEARTBEAT_S`."""
        events = tuple(self._engine.drain_kv_events())
        load = self._load()
        now = time.monotonic()
        recent = now - self._last_sent < LOAD_INTERVAL_S and not idle
        heartbeat = now - self._last_sent >= HEARTBEAT_S
        if not events and not heartbeat and (load == self._last_load or recent):
            return
        self._append(events, load)
        self._last_load, self._last_sent = load, now

    def snapshot(self) -> bytes:
        """Everything cached now, as of the batch just published (pending events go first, so
        the snapshot and the batch numbers agree)."""
        events = tuple(self._engine.drain_kv_events())
        load = self._load()
        if events:
            self._append(events, load)
        blocks = tuple(self._engine.cached_blocks())
        return encode_snapshot(KVSnapshot(self.worker_id, self.epoch, self._seq, blocks, load))

    def _append(self, events: tuple, load: WorkerLoad) -> None:
        self._seq += 1
        self._queue.append(
            encode_batch(KVEventBatch(self.worker_id, self.epoch, self._seq, events, load))
        )
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._ready.set)

    async def stream(self) -> AsyncIterator[bytes]:
        while True:
            while not self._queue:
                self._ready.clear()
                await self._ready.wait()
            yield self._queue.popleft()

    def _load(self) -> WorkerLoad:
        s = self._engine.stats()
        return WorkerLoad(s.running, s.waiting + s.reserved, s.free_blocks, s.total_blocks)
