"""The token link between router and decode worker: tickets, order, backlog, replacement."""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import socket

import pytest

from pdserve.api.messages import LinkAddress, PrefillRequest, StepOutputs, TokenDelta
from pdserve.api.sampling import SamplingParams
from pdserve.api.token_link import TokenLinkClient
from pdserve.decode_worker.token_link import TokenLink


def _outputs(i: int, pad: int = 0) -> StepOutputs:
    return StepOutputs("decode-0", (TokenDelta(f"r{i}", (i,) * (1 + pad)),))


async def _read_ids(link: TokenLinkClient, n: int) -> list[int]:
    ids = []
    while len(ids) < n:
        outputs = await asyncio.wait_for(link.read(), 10)
        ids += [d.token_ids[0] for d in outputs.deltas]
    return ids


def test_outputs_sent_before_the_router_connects_arrive_in_order():
    async def scenario():
        worker = TokenLink("127.0.0.1", lambda _: None)
        for i in range(5):
            worker.send(_outputs(i))
        link = await TokenLinkClient.connect(worker.open())
        worker.send(_outputs(5))
        assert await _read_ids(link, 6) == list(range(6))
        link.close()

    asyncio.run(scenario())


def test_a_wrong_or_reused_ticket_is_refused_before_anything_is_read():
    async def scenario():
        requests = queue.SimpleQueue()
        worker = TokenLink("127.0.0.1", requests.put)
        address = worker.open()
        wrong = dataclasses.replace(address, ticket=bytes(len(address.ticket)))
        intruder = await TokenLinkClient.connect(wrong)
        intruder.send(PrefillRequest("x", (1,), SamplingParams(), "decode-0"))
        with pytest.raises((EOFError, ConnectionResetError)):  # the worker closed it
            await asyncio.wait_for(intruder.read(), 10)
        router = await TokenLinkClient.connect(address)
        worker.send(_outputs(1))
        assert await _read_ids(router, 1) == [1]
        reuse = await TokenLinkClient.connect(address)  # a ticket admits one connection
        with pytest.raises(EOFError):
            await asyncio.wait_for(reuse.read(), 10)
        assert requests.empty()
        router.close()

    asyncio.run(scenario())


def test_requests_from_the_router_reach_the_worker():
    async def scenario():
        requests = queue.SimpleQueue()
        worker = TokenLink("127.0.0.1", requests.put)
        link = await TokenLinkClient.connect(worker.open())
        sent = [PrefillRequest(f"r{i}", (1, 2, i), SamplingParams(), "decode-0") for i in range(3)]
        for request in sent:
            link.send(request)
        got = [await asyncio.to_thread(requests.get, timeout=10) for _ in sent]
        assert got == sent
        link.close()

    asyncio.run(scenario())


def test_a_router_that_stops_reading_never_blocks_the_sender_and_misses_nothing():
    async def scenario():
        worker = TokenLink("127.0.0.1", lambda _: None)
        link = await TokenLinkClient.connect(worker.open())
        await asyncio.sleep(0.1)  # joined
        n = 400  # ~40 MB of frames: far more than the socket buffers hold

        def send_all() -> None:  # as the engine thread does, while nobody reads
            for i in range(n):
                worker.send(_outputs(i, pad=25_000))

        await asyncio.wait_for(asyncio.to_thread(send_all), 30)  # a blocking send never ends
        assert await _read_ids(link, n) == list(range(n))
        link.close()

    asyncio.run(scenario())


def test_a_new_connection_replaces_the_old_one_and_starts_at_a_whole_frame():
    async def scenario():
        worker = TokenLink("127.0.0.1", lambda _: None)
        old = await TokenLinkClient.connect(worker.open())
        worker.send(_outputs(0))
        assert await _read_ids(old, 1) == [0]
        for i in range(1, 200):  # a backlog the old router never reads
            worker.send(_outputs(i, pad=25_000))
        new = await TokenLinkClient.connect(worker.open())
        worker.send(_outputs(200))
        with pytest.raises(EOFError):  # the old connection was closed by the worker
            while True:
                await asyncio.wait_for(old.read(), 10)
        ids = await _read_ids(new, 1)
        while ids[-1] != 200:  # whatever the old one had not taken, then the new output
            ids += await _read_ids(new, 1)
        assert ids == sorted(ids) and ids[0] >= 1
        new.close()

    asyncio.run(scenario())


def test_the_link_listens_on_the_given_address_only():
    worker = TokenLink("127.0.0.2", lambda _: None)
    address = worker.open()
    assert isinstance(address, LinkAddress) and address.host == "127.0.0.2"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", address.port), timeout=2).close()
