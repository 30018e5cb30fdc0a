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
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from pdserve.api.kv_events import decode_batch, decode_snapshot
from pdserve.router.index import RadixIndex

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
    """Consumes every source from `start` to `stop`. When a worker's events end or fail, its
    blocks leave the index (placement then sees no cache there) and the task ends."""

    def __init__(self, index: RadixIndex, sources: Mapping[str, KVSource]) -> None:
        self._index = index
        self._sources = dict(sources)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._consume(worker_id, source), name=f"kv-events-{worker_id}")
            for worker_id, source in self._sources.items()
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _consume(self, worker_id: str, source: KVSource) -> None:
        try:
            async for data in source.events():
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
            reason = "the events ended"
        except asyncio.CancelledError:
            raise
        except Exception as e:
            reason = f"the events failed: {type(e).__name__}: {e}"
        logger.warning("KV index: %s dropped: %s", worker_id, reason)
        self._index.remove_worker(worker_id)


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
