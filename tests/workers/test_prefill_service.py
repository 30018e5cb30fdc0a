"""A prefill service and a decode service on one event loop (no Ray): the KV crosses a real
gloo channel; aborts and failures at awkward moments free every block on both sides."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from types import SimpleNamespace

import torch
from engine_helpers import generate, make_engine
from worker_helpers import token_stream

from pdserve.api.messages import ChannelAddress, PrefillRequest
from pdserve.api.sampling import SamplingParams
from pdserve.decode_worker.service import DecodeService
from pdserve.engine.config import EngineConfig
from pdserve.prefill_worker.service import PrefillService

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, seed=3)
PROMPT = tuple(torch.randint(3, 990, (70,), generator=torch.Generator().manual_seed(2)).tolist())


class LocalHandle:
    """Calls a service in this process the way `handle.method.remote(...)` calls an actor."""

    def __init__(self, service: object) -> None:
        self._service = service

    def __getattr__(self, name: str) -> SimpleNamespace:
        method = getattr(self._service, name)
        return SimpleNamespace(remote=lambda *a, **k: asyncio.ensure_future(method(*a, **k)))


async def _services(model_dir):
    config = EngineConfig(model=str(model_dir), num_blocks=64, max_num_batched_tokens=32)
    decode = DecodeService("decode-0", config, "127.0.0.1", b"s", 5.0)
    prefill = PrefillService(
        "prefill-0", config, "127.0.0.1", b"s", 5.0, lambda _: LocalHandle(decode)
    )
    await decode.start()
    await prefill.start()
    return prefill, decode


async def _tokens(decode: DecodeService, request_id: str) -> list[int]:
    stream, tokens = token_stream(decode), []
    while True:
        outputs = await asyncio.wait_for(anext(stream), 30)
        for d in outputs.deltas:
            if d.attempt_id == request_id:
                tokens += d.token_ids
                if d.finish_reason:
                    return tokens


async def _idle(*services) -> bool:
    """Nothing running, waiting or reserved, every block back (each worker's own account)."""
    for s in services:
        st = await s.status()
        if st.running or st.waiting or st.free_blocks != st.total_blocks:
            return False
    return True


def test_chunked_prefill_crosses_the_channel_and_decodes_like_one_engine(tiny_llama_dir):
    expected = generate(make_engine(tiny_llama_dir), [PROMPT], PARAMS)[0]

    async def scenario():
        prefill, decode = await _services(tiny_llama_dir)
        result = await prefill.prefill(PrefillRequest("r", PROMPT, PARAMS, "decode-0"))
        assert result.ok
        assert await _tokens(decode, "r") == expected
        assert (await decode.status()).prompt_tokens_computed == 0
        assert await _idle(prefill, decode)

    asyncio.run(scenario())


def test_abort_while_the_reservation_travels_frees_both_sides(tiny_llama_dir):
    async def scenario():
        prefill, decode = await _services(tiny_llama_dir)
        task = asyncio.ensure_future(
            prefill.prefill(PrefillRequest("r", PROMPT, PARAMS, "decode-0"))
        )
        await asyncio.sleep(0)  # registered, computing, its reservation not back yet
        assert await prefill.abort("r")
        result = await task
        assert not result.ok and result.error_code == "CANCELLED"
        for _ in range(200):
            if await _idle(prefill, decode):
                break
            await asyncio.sleep(0.01)
        assert await _idle(prefill, decode)

    asyncio.run(scenario())


def test_a_full_decode_pool_queues_the_request_there_and_decodes_it_once_blocks_free(
    tiny_llama_dir,
):
    expected = generate(make_engine(tiny_llama_dir), [PROMPT], PARAMS)[0]

    async def scenario():
        prefill, decode = await _services(tiny_llama_dir)
        # another transfer holds 60 of the 64 blocks
        other = tuple(range(3, 3 + 60 * 16 - 1))
        await decode._core.call(decode.engine.reserve, "other", other, PARAMS)
        result = await prefill.prefill(PrefillRequest("r", PROMPT, PARAMS, "decode-0"))
        assert result.ok  # not refused: queued on the decode worker
        prefill_status = await prefill.status()  # it dropped what it had computed
        assert prefill_status.running == 0
        assert prefill_status.free_blocks == prefill_status.total_blocks
        await asyncio.sleep(0.2)
        status = await decode.status()
        # "r" waits for its blocks without starting (no compute, preempt, recompute churn)
        assert status.waiting == 2 and status.running == 0  # "other" (reserved) and "r"
        assert status.prompt_tokens_computed == 0
        await decode._core.call(decode.engine.abort, "other")
        assert await _tokens(decode, "r") == expected
        assert (await decode.status()).prompt_tokens_computed == len(PROMPT)
        assert await _idle(prefill, decode)

    asyncio.run(scenario())


def test_decode_max_num_seqs_bounds_transferred_requests(tiny_llama_dir):
    """Five transfers land on a decode worker that runs two sequences at a time: the other
    three wait with their KV (counted by the scheduler) until a slot frees."""
    params = dataclasses.replace(PARAMS, max_tokens=32)  # long enough for the five to overlap
    expected = generate(make_engine(tiny_llama_dir), [PROMPT], params)[0]

    async def scenario():
        config = EngineConfig(model=str(tiny_llama_dir), num_blocks=64, max_num_seqs=2)
        decode = DecodeService("decode-0", config, "127.0.0.1", b"s", 5.0)
        prefill = PrefillService(
            "prefill-0",
            dataclasses.replace(config, max_num_seqs=8),
            "127.0.0.1",
            b"s",
            5.0,
            lambda _: LocalHandle(decode),
        )
        await decode.start()
        await prefill.start()
        stream, outputs, running = token_stream(decode), {}, set()

        async def watch():  # the decode worker's own account, between its steps
            while True:
                running.add((await decode.status()).running)
                await asyncio.sleep(0.001)

        watcher = asyncio.ensure_future(watch())
        results = await asyncio.gather(
            *(
                prefill.prefill(PrefillRequest(f"r{i}", PROMPT, params, "decode-0"))
                for i in range(5)
            )
        )
        assert all(r.ok for r in results)
        while len([o for o in outputs.values() if o[1]]) < 5:
            batch = await asyncio.wait_for(anext(stream), 30)
            for d in batch.deltas:
                tokens, done = outputs.get(d.attempt_id, ([], False))
                outputs[d.attempt_id] = (tokens + list(d.token_ids), bool(d.finish_reason))
        watcher.cancel()
        assert max(running) == 2
        assert all(tokens == expected for tokens, _ in outputs.values())
        assert await _idle(prefill, decode)

    asyncio.run(scenario())


class _UnreachableDecode(DecodeService):
    """A decode worker whose channel address nobody serves (its store died)."""

    async def open_channel(
        self, prefill_id: str, prefill_tp: int
    ) -> tuple[tuple[int, int, ChannelAddress], ...]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return ((0, 0, ChannelAddress("127.0.0.1", port, 1)),)


def test_no_channel_is_reported_and_the_decode_worker_prefills_the_request(tiny_llama_dir):
    expected = generate(make_engine(tiny_llama_dir), [PROMPT], PARAMS)[0]

    async def scenario():
        config = EngineConfig(model=str(tiny_llama_dir), num_blocks=64)
        decode = _UnreachableDecode("decode-0", config, "127.0.0.1", b"s", 1.0)
        prefill = PrefillService(
            "prefill-0", config, "127.0.0.1", b"s", 1.0, lambda _: LocalHandle(decode)
        )
        await decode.start()
        await prefill.start()
        result = await prefill.prefill(PrefillRequest("r", PROMPT, PARAMS, "decode-0"))
        assert result.ok
        assert await _tokens(decode, "r") == expected
        assert (await decode.status()).prompt_tokens_computed == len(PROMPT)
        assert await _idle(prefill, decode)

    asyncio.run(scenario())
