"""Feeds the global radix index from every worker's KV events: one task per worker.

Each worker (prefill and decode) offers `kv_events()`, a Ray streaming generator of
msgpack-encoded `KVEventBatch`es, and `kv_snapshot()`, its whole cache as an encoded
`KVSnapshot`. A batch that does not follow the last one the index applied (a gap, or a
worker's new epoch after a restart) makes the task ask for a snapshot, which replaces what
the index knew of that worker; batches the snapshot already covers are dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

from pdserve.api.kv_events import decode_batch, decode_snapshot
from pdserve.router.index import RadixIndex
from pdserve.router.registry import describe

logger = logging.getLogger(__name__)


class KVSource(Protocol):
    """Where one worker's KV events come from."""

    def events(self) -> AsyncIterator[bytes]: ...

    async def snapshot(self) -> bytes: ...


class ActorKVSource:
    """The KV events of a worker's Ray actor."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    async def events(self) -> AsyncIterator[bytes]:
        async for ref in self._handle.kv_events.options(num_returns="streaming").remote():
            yield await ref

    async def snapshot(self) -> bytes:
        return await self._handle.kv_snapshot.remote()


class KVFeed:
    """Consumes every source from `start` (or a worker's `watch`) to `stop`. When a worker's
    events end or fail, its blocks leave the index (placement then sees no cache there),
    `on_lost(worker_id, reason, epoch)` hears of it, and the task ends; `watch` consumes them
    anew once the worker is back (its first batch is of a new epoch: the index resyncs).

    A worker's engine thread publishes at least every `kv_events.HEARTBEAT_S`, idle or not:
    events that stop for `stall_timeout_s` mean a stuck worker, which `on_stuck(worker_id,
    reason, epoch)` hears of instead."""

    def __init__(
        self,
        index: RadixIndex,
        sources: Mapping[str, KVSource],
        on_lost: Callable[[str, str, int], None] | None = None,
        on_stuck: Callable[[str, str, int], None] | None = None,
        stall_timeout_s: float | None = None,
    ) -> None:
        self._index = index
        self._sources = dict(sources)
        self._on_lost, self._on_stuck = on_lost, on_stuck
        self._stall_timeout_s = stall_timeout_s
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self) -> None:
        for worker_id in self._sources:
            self.watch(worker_id, 0)

    def watch(self, worker_id: str, epoch: int) -> None:
        """Consumes the worker's events (in its registration `epoch`), replacing any earlier
        consumer of them."""
        old = self._tasks.get(worker_id)
        if old is not None:
            old.cancel()
        self._tasks[worker_id] = asyncio.create_task(
            self._consume(worker_id, epoch, self._sources[worker_id]),
            name=f"kv-events-{worker_id}",
        )

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = {}

    async def _consume(self, worker_id: str, epoch: int, source: KVSource) -> None:
        report, events = self._on_lost, aiter(source.events())
        try:
            while True:
                try:
                    async with asyncio.timeout(self._stall_timeout_s):
                        data = await anext(events)
                except StopAsyncIteration:
                    reason = "its KV events ended"
                    break
                except TimeoutError:
                    reason = f"no KV events, not even a heartbeat, for {self._stall_timeout_s:g} s"
                    report = self._on_stuck
                    break
                batch = decode_batch(data)
                if batch.worker_id != worker_id:
                    raise ValueError(f"a batch of {batch.worker_id!r} in the events of {worker_id}")
                if self._index.apply(batch):
                    continue
                snapshot = decode_snapshot(await _snapshot(source))
                if snapshot.worker_id != worker_id:
                    raise ValueError(f"a snapshot of {snapshot.worker_id!r} from {worker_id}")
                self._index.resync(snapshot)
                logger.info(
                    "KV index: resynced %s at epoch %d seq %d (%d blocks)",
                    worker_id,
                    snapshot.epoch,
                    snapshot.seq,
                    len(snapshot.blocks),
                )
                # NOTE: the snapshot was taken after this batch was published, so it covers
                # the batch unless the batch belongs to an older epoch; either way it is done.
                self._index.apply(batch)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.warning("KV index: the events of %s failed: %s", worker_id, e)
            reason = describe(e)
        logger.warning("KV index: %s dropped: %s", worker_id, reason)
        self._index.remove_worker(worker_id)
        if report is not None:
            report(worker_id, reason, epoch)


SNAPSHOT_RETRIES_S = (0.1, 0.5, 2.0)


async def _snapshot(source: KVSource) -> bytes:
    """A snapshot, retried after a failed call (a worker busy starting, a transient RPC
    error); the last failure propagates and drops the worker from the index."""
    for delay in SNAPSHOT_RETRIES_S:
        try:
            return await source.snapshot()
        except Exception as e:
            logger.warning("KV index: a snapshot failed (%s); retrying in %.1f s", e, delay)
            await asyncio.sleep(delay)
    return await source.snapshot()
