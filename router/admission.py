"""Admission: a request runs once the decode workers' KV pools can hold it, and until then waits
in a bounded queue.

Each admitted request is charged the KV blocks it can come to hold on its decode worker (its
context plus `max_tokens`) until it ends, against the sum of the decode workers' pools. A
request that does not fit waits, ordered by priority (lower first, as in vLLM) and then
arrival; whenever blocks come back, queued requests are admitted from the head while they fit
(a large request at the head is not overtaken, so none starves). The only refusals
(RESOURCE_EXHAUSTED) are decided at arrival, before any work: the queue is full, or the
request's deadline is shorter than the wait the queue predicts for it.

The queue lives here, in the router, because the router alone sees every request before any
work is done for it (a refusal costs the client nothing), knows its size, and can order all
that wait by priority. The workers keep a safety net: a decode worker whose blocks are busy
when a transfer asks for them (requests of another router, or an imbalance between decode
workers, whose pools admission counts as one) queues the request and prefills it itself.

NOTE: charging `max_tokens` up front means that requests admitted here do not compete for the
blocks of one decode worker (no preemption among them, unless placement crowds one worker);
one that ends early returns its blocks at once. With nothing charged a request is always
admitted: validation keeps every request within `max_model_len`, which fits one worker's pool.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.api.errors import CapacityExceeded

# Weight of the newest admission interval in the moving average that predicts queue waits.
_EWMA = 0.2


@dataclass(order=True)
class _Waiter:
    priority: int
    arrival: int
    blocks: int = field(compare=False)
    admitted: asyncio.Future[None] = field(compare=False)
    gone: bool = field(default=False, compare=False)  # left the queue (cancelled or refused)


class Admission:
    """Counts KV blocks against `capacity` (blocks per decode worker, set as workers report)."""

    def __init__(self, max_queued: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_queued = max_queued
        self.capacity: dict[str, int] = {}
        self.charged = 0
        self._clock = clock
        self._queue: list[_Waiter] = []
        self._num_queued = 0
        self._arrivals = itertools.count()
        self._last_admit: float | None = None  # from the queue, while it was not empty
        self._interval: float | None = None  # moving average between admissions from the queue

    @property
    def num_queued(self) -> int:
        return self._num_queued

    def refuse_if_full(self) -> None:
        """Raises `CapacityExceeded` when requests wait and the queue has no room for one
        more: a newcomer, whatever its priority, is refused before it costs any work."""
        if self._num_queued and self._num_queued >= self.max_queued:
            raise _queue_full(self._num_queued, self.max_queued)

    def set_capacity(self, worker_id: str, blocks: int) -> None:
        self.capacity[worker_id] = blocks
        self._admit_waiting()

    def remove(self, worker_id: str) -> None:
        self.capacity.pop(worker_id, None)

    async def acquire(
        self, blocks: int, priority: int = 0, deadline_s: float | None = None
    ) -> None:
        """Returns once `blocks` are charged to the caller, who must `release` them. Raises
        `CapacityExceeded` at once when the request would have to queue and cannot."""
        waiter = _Waiter(priority, next(self._arrivals), blocks, asyncio.Future())
        heapq.heappush(self._queue, waiter)
        self._num_queued += 1
        self._admit_waiting()
        if waiter.admitted.done():
            return
        if self._last_admit is None:
            self._last_admit = self._clock()  # the queue starts: its pace is timed from here
        try:
            self._check_can_wait(waiter, deadline_s)
            await waiter.admitted
        except BaseException:
            if waiter.admitted.done() and not waiter.admitted.cancelled():
                self.release(blocks)  # admitted just as the caller went away
            elif not waiter.gone:
                self._leave(waiter)
                self._admit_waiting()  # it may have blocked smaller requests behind it
            raise

    def release(self, blocks: int) -> None:
        self.charged -= blocks
        self._admit_waiting()

    def _check_can_wait(self, waiter: _Waiter, deadline_s: float | None) -> None:
        others = self._num_queued - 1
        if others >= self.max_queued:
            raise _queue_full(others, self.max_queued)
        if deadline_s is not None and self._interval is not None:
            ahead = sum(1 for w in self._queue if not w.gone and w < waiter)
            wait = (ahead + 1) * self._interval
            if wait > deadline_s:
                raise CapacityExceeded(
                    f"{ahead} requests wait for KV blocks ahead of this one, about {wait:.2f} s; "
                    f"its deadline is in {deadline_s:.2f} s"
                )

    def _fits(self, blocks: int) -> bool:
        """True with nothing charged, or while no decode worker has reported its pool."""
        if self.charged == 0 or not self.capacity:
            return True
        return self.charged + blocks <= sum(self.capacity.values())

    def _admit_waiting(self) -> None:
        while self._queue:
            head = self._queue[0]
            if head.gone:
                heapq.heappop(self._queue)
                continue
            if not self._fits(head.blocks):
                break
            heapq.heappop(self._queue)
            self.charged += head.blocks
            head.admitted.set_result(None)
            self._note_admission()
            self._leave(head)

    def _leave(self, waiter: _Waiter) -> None:
        waiter.gone = True
        self._num_queued -= 1
        if not self._num_queued:
            self._last_admit = None  # the queue's pace is timed only while requests wait

    def _note_admission(self) -> None:
        """Keeps the average time between admissions while requests wait: the queue's pace."""
        if self._last_admit is None:
            return
        now = self._clock()
        gap = now - self._last_admit
        self._interval = (
            gap if self._interval is None else _EWMA * gap + (1 - _EWMA) * self._interval
        )
        self._last_admit = now


def _queue_full(waiting: int, max_queued: int) -> CapacityExceeded:
    return CapacityExceeded(
        f"{waiting} requests wait for KV blocks; the router queues at most {max_queued} "
        "(router.max_queued)"
    )
