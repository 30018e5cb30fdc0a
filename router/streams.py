"""Token streams from the decode workers, dispatched to one queue per request.

Each decode worker has ONE token link (`pdserve.api.token_link`) that carries a `StepOutputs`
per engine step for all its requests; the router consumes it from start to stop, and sends on
it the requests the worker prefills itself. A request registers its queue before its prefill
call is made, because its first tokens may arrive before that call returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pdserve.api.messages import PrefillRequest, TokenDelta
from pdserve.api.token_link import TokenLinkClient
from pdserve.router.registry import describe

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """Ends a request with the gRPC status named `code` (put on its queue by the router).
    A `retryable` one (the path to a worker broke) moves the request to another worker."""

    code: str
    message: str
    retryable: bool = False


@dataclass(frozen=True)
class Lost:
    """The decode worker of the request's attempt is down: its remaining tokens must come from
    elsewhere."""

    worker_id: str


Event = TokenDelta | Failure | Lost
LINK_TIMEOUT_S = 10.0


class DecodeStreams:
    """Consumes each decode worker's token link, from `watch` (at start, and again whenever the
    worker comes back) to `stop`; `on_lost(worker_id, reason, epoch)` hears when one ends."""

    def __init__(self, decode: Mapping[str, Any], on_lost: Callable[[str, str, int], None]) -> None:
        self._decode = dict(decode)
        self._on_lost = on_lost
        self._queues: dict[str, tuple[str, asyncio.Queue[Event]]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._links: dict[str, asyncio.Future[TokenLinkClient]] = {}

    def watch(self, worker_id: str, epoch: int) -> None:
        """Consumes the worker's token link (in its registration `epoch`), replacing any
        earlier consumer of it."""
        old = self._tasks.get(worker_id)
        if old is not None:
            old.cancel()  # NOTE: a task cancelled before it ran never reaches its `finally`
            _fail(self._links[worker_id], "its token link was replaced")
        ready = self._links[worker_id] = asyncio.get_running_loop().create_future()
        self._tasks[worker_id] = asyncio.create_task(
            self._consume(worker_id, epoch, self._decode[worker_id], ready),
            name=f"stream-{worker_id}",
        )

    async def submit(self, worker_id: str, request: PrefillRequest) -> None:
        """Hands `request` to the decode worker to prefill itself, over its token link (once
        the link is up); raises ConnectionError, saying why, if it cannot."""
        ready = self._links.get(worker_id)
        if ready is None:
            raise ConnectionError("it has no token link")
        if not ready.done():  # only while the link is being set up
            try:
                await asyncio.wait_for(asyncio.shield(ready), LINK_TIMEOUT_S)
            except TimeoutError:
                raise ConnectionError(
                    f"its token link was not up within {LINK_TIMEOUT_S:.0f} s"
                ) from None
        ready.result().send(request)  # raises the link's ConnectionError if it never came up

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = {}

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

    def lose(self, worker_id: str) -> None:
        """Tells every attempt on `worker_id` that its worker is down."""
        for w, queue in list(self._queues.values()):
            if w == worker_id:
                queue.put_nowait(Lost(worker_id))

    async def _consume(
        self,
        worker_id: str,
        epoch: int,
        handle: Any,
        ready: asyncio.Future[TokenLinkClient],
    ) -> None:
        link = None
        reason = "the router stopped"
        try:
            link = await TokenLinkClient.connect(await handle.token_link.remote())
            ready.set_result(link)
            while True:
                outputs = await link.read()
                for delta in outputs.deltas:
                    entry = self._queues.get(delta.attempt_id)
                    # NOTE: deltas of a request that already ended (cancelled, stopped by a stop
                    # string) keep coming until the worker sees the abort; they are dropped.
                    if entry is not None:
                        entry[1].put_nowait(delta)
        except EOFError:
            reason = "its token link closed"
        except Exception as e:
            logger.warning("decode worker %s: token link failed: %s", worker_id, e)
            reason = describe(e)
        finally:
            if link is not None:
                link.close()
            _fail(ready, reason)
        self._on_lost(worker_id, reason, epoch)


def _fail(ready: asyncio.Future[TokenLinkClient], reason: str) -> None:
    """Tells whoever waits for a link that never came up why (unless it did)."""
    if not ready.done():
        ready.set_exception(ConnectionError(reason))
        ready.exception()  # read here: a request may never ask for it
