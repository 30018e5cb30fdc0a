"""Token streams from the decode workers, dispatched to one queue per request.

Each decode worker has ONE Ray streaming generator that yields a `StepOutputs` per engine step
for all its requests; the router consumes it from start to stop. A request registers its queue
before its prefill call is made, because its first tokens may arrive before that call returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pdserve.api.messages import TokenDelta

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """Ends a request with the gRPC status named `code` (put on its queue by the router)."""

    code: str
    message: str


Event = TokenDelta | Failure


class DecodeStreams:
    """Consumes every decode worker's stream; `on_lost(worker_id, reason)` is called when one
    ends."""

    def __init__(self, decode: Mapping[str, Any], on_lost: Callable[[str, str], None]) -> None:
        self._decode = dict(decode)
        self._on_lost = on_lost
        self._queues: dict[str, tuple[str, asyncio.Queue[Event]]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._consume(worker_id, handle), name=f"stream-{worker_id}")
            for worker_id, handle in self._decode.items()
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def register(self, attempt_id: str, worker_id: str) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._queues[attempt_id] = (worker_id, queue)
        return queue

    def unregister(self, attempt_id: str) -> None:
        self._queues.pop(attempt_id, None)

    def push(self, attempt_id: str, event: Event) -> None:
        """Adds an event of the router's own (a failure, an abort) to a request's queue."""
        entry = self._queues.get(attempt_id)
        if entry is not None:
            entry[1].put_nowait(event)

    async def _consume(self, worker_id: str, handle: Any) -> None:
        try:
            async for ref in handle.stream.options(num_returns="streaming").remote():
                outputs = await ref
                for delta in outputs.deltas:
                    entry = self._queues.get(delta.attempt_id)
                    # NOTE: deltas of a request that already ended (cancelled, stopped by a stop
                    # string) keep coming until the worker sees the abort; they are dropped.
                    if entry is not None:
                        entry[1].put_nowait(delta)
            reason = "the stream ended"
        except asyncio.CancelledError:
            raise
        except Exception as e:
            reason = f"the stream failed: {type(e).__name__}: {e}"
        logger.error("decode worker %s is lost: %s", worker_id, reason)
        self._on_lost(worker_id, reason)
        for w, queue in list(self._queues.values()):
            if w == worker_id:
                queue.put_nowait(Failure("UNAVAILABLE", f"decode worker {worker_id}: {reason}"))
