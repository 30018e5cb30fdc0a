"""Admission on its own: requests wait for KV blocks in a bounded queue, by priority and then
arrival, and are refused only at arrival (queue full, deadline shorter than the wait)."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.api.client import build_request
from pdserve.api.errors import CapacityExceeded
from pdserve.router.admission import Admission
from pdserve.router.router import Router


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def admission(capacity: int, max_queued: int = 100, clock=None) -> Admission:
    a = Admission(max_queued, clock=clock) if clock else Admission(max_queued)
    a.set_capacity("decode-0", capacity)
    return a


def test_requests_beyond_the_pool_wait_and_run_as_blocks_return():
    async def scenario():
        a = admission(10)
        await a.acquire(6)
        waiting = asyncio.ensure_future(a.acquire(6))
        await settle()
        assert not waiting.done() and a.num_queued == 1 and a.charged == 6
        a.release(6)
        await waiting
        assert a.num_queued == 0 and a.charged == 6

    run(scenario())


def test_lower_priority_value_runs_first_then_arrival():
    async def scenario():
        a = admission(1)
        await a.acquire(1)
        order = []

        async def request(name, priority):
            await a.acquire(1, priority)
            order.append(name)

        tasks = [
            asyncio.ensure_future(request(name, priority))
            for name, priority in [("late-1", 1), ("zero-a", 0), ("urgent", -5), ("zero-b", 0)]
        ]
        await settle()
        for _ in tasks:
            a.release(1)
            await settle()
        await asyncio.gather(*tasks)
        assert order == ["urgent", "zero-a", "zero-b", "late-1"]

    run(scenario())


def test_a_full_queue_refuses_a_newcomer_at_once():
    async def scenario():
        a = admission(1, max_queued=2)
        await a.acquire(1)
        queued = [asyncio.ensure_future(a.acquire(1)) for _ in range(2)]
        await settle()
        with pytest.raises(CapacityExceeded, match="2 requests wait.*router.max_queued"):
            a.refuse_if_full()
        with pytest.raises(CapacityExceeded, match="queues at most 2"):
            await a.acquire(1)
        assert a.num_queued == 2
        for task in queued:
            task.cancel()
        await settle()
        assert a.num_queued == 0 and a.charged == 1

    run(scenario())


def test_max_queued_zero_refuses_instead_of_queueing_but_admits_what_fits():
    async def scenario():
        a = admission(2, max_queued=0)
        a.refuse_if_full()  # an empty queue is never full
        await a.acquire(2)
        with pytest.raises(CapacityExceeded):
            await a.acquire(1)
        a.release(2)
        await a.acquire(1)

    run(scenario())


def test_a_large_request_at_the_head_is_not_overtaken_by_smaller_ones():
    async def scenario():
        a = admission(10)
        await a.acquire(5)
        large = asyncio.ensure_future(a.acquire(8))
        await settle()
        small = asyncio.ensure_future(a.acquire(1))  # would fit now, but arrived later
        await settle()
        assert not large.done() and not small.done()
        a.release(5)
        await asyncio.gather(large, small)
        assert a.charged == 9

    run(scenario())


def test_a_cancelled_waiter_leaves_and_lets_the_next_one_through():
    async def scenario():
        a = admission(10)
        await a.acquire(5)
        large = asyncio.ensure_future(a.acquire(8))
        await settle()
        small = asyncio.ensure_future(a.acquire(2))
        await settle()
        large.cancel()
        await settle()
        assert small.done() and a.charged == 7 and a.num_queued == 0

    run(scenario())


def test_with_nothing_charged_a_request_larger_than_the_pool_runs():
    async def scenario():
        a = admission(4)
        await a.acquire(9)
        assert a.charged == 9

    run(scenario())


def test_a_deadline_shorter_than_the_predicted_wait_is_refused_at_once():
    now = [0.0]

    async def scenario():
        a = admission(1, clock=lambda: now[0])
        await a.acquire(1)
        first = [asyncio.ensure_future(a.acquire(1)) for _ in range(3)]
        await settle()
        for task in first:  # the queue moves one request every 2 s
            now[0] += 2.0
            a.release(1)
            await task
        more = [asyncio.ensure_future(a.acquire(1)) for _ in range(2)]
        await settle()
        # two ahead, about 2 s each: 6 s until its turn
        with pytest.raises(CapacityExceeded, match="2 requests wait for KV blocks ahead"):
            await a.acquire(1, deadline_s=5.0)
        patient = asyncio.ensure_future(a.acquire(1, deadline_s=7.0))
        await settle()
        assert not patient.done() and a.num_queued == 3
        for task in (*more, patient):
            task.cancel()

    run(scenario())


def test_without_a_known_pool_admission_does_not_limit():
    async def scenario():
        a = Admission(max_queued=0)
        for _ in range(5):
            await a.acquire(1000)
        assert a.charged == 5000

    run(scenario())


def test_a_request_cancelled_right_after_its_admission_returns_its_blocks(tokenizer):
    """The admission completes, then the call is cancelled before it resumes: the blocks it
    was charged must come back."""

    async def scenario():
        router = Router(tokenizer, {}, {}, vocab_size=tokenizer.vocab_size, max_model_len=64)
        router.admission.set_capacity("decode-0", 1)
        await router.admission.acquire(1)
        call = asyncio.ensure_future(router.generate(build_request([5, 6, 7]), send=None))
        await settle()
        assert router.num_queued == 1
        router.admission.release(1)  # admits it ...
        await asyncio.sleep(0)  # ... and its admission finishes
        call.cancel()  # before the call itself runs on
        with pytest.raises(asyncio.CancelledError):
            await call
        assert router.admission.charged == 0 and router.num_inflight == 0

    run(scenario())
