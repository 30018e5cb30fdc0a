"""A worker's KV events feed the router's index: real services, publisher, feed and index on one
event loop (no Ray)."""

from __future__ import annotations

import asyncio

import torch
from worker_helpers import token_stream

from pdserve.api.block_hash import block_hashes, model_salt
from pdserve.api.messages import PrefillRequest
from pdserve.api.sampling import SamplingParams
from pdserve.decode_worker.service import DecodeService
from pdserve.engine.config import EngineConfig
from pdserve.router.index import RadixIndex
from pdserve.router.kv_feed import KVFeed

PARAMS = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, seed=1)


def _tokens(n: int, seed: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(3, 1000, (n,), generator=g).tolist())


class RestartableSource:
    """One worker id whose process is replaced: the events of whichever service runs now (as a
    restarted actor's re-issued stream would be)."""

    def __init__(self, service: DecodeService) -> None:
        self.service = service
        self.restarted = asyncio.Event()

    async def events(self):
        while True:
            stream = self.service.kv_events()
            waiter = asyncio.ensure_future(self.restarted.wait())
            while True:
                batch = asyncio.ensure_future(anext(stream))
                await asyncio.wait({batch, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if batch.done():
                    yield batch.result()
                    continue
                batch.cancel()
                self.restarted.clear()
                break

    async def snapshot(self) -> bytes:
        return await self.service.kv_snapshot()


async def _serve(svc: DecodeService, rid: str, prompt: tuple[int, ...]) -> None:
    await svc.prefill_locally(PrefillRequest(rid, prompt, PARAMS, svc.worker_id))
    stream = token_stream(svc)
    while True:
        outputs = await asyncio.wait_for(anext(stream), 30)
        if any(d.attempt_id == rid and d.finish_reason for d in outputs.deltas):
            return


async def _until(predicate, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_events_build_the_index_and_a_restarted_worker_replaces_what_it_knew(tiny_llama_dir):
    config = EngineConfig(model=str(tiny_llama_dir), num_blocks=32)
    salt = model_salt(config.model, config.dtype, config.block_size)
    first, second = _tokens(70, 1), _tokens(40, 2)

    async def scenario():
        index = RadixIndex()
        old = DecodeService("decode-0", config, "127.0.0.1", b"s", 5.0)
        await old.start()
        source = RestartableSource(old)
        feed = KVFeed(index, {"decode-0": source})
        feed.start()
        await _serve(old, "a", first)
        first_blocks = block_hashes(first, 16, salt)
        await _until(lambda: index.match(first_blocks).get("decode-0") == 4)

        new = DecodeService("decode-0", config, "127.0.0.1", b"s", 5.0)  # a new process: new epoch
        await new.start()
        await _serve(new, "b", second)
        source.service = new
        source.restarted.set()
        second_blocks = block_hashes(second, 16, salt)
        await _until(lambda: index.blocks_of("decode-0") == set(second_blocks))
        assert index.match(first_blocks) == {}
        await feed.stop()

    asyncio.run(scenario())


class _ServiceSource:
    def __init__(self, service: DecodeService) -> None:
        self.service = service

    def events(self):
        return self.service.kv_events()

    async def snapshot(self) -> bytes:
        return await self.service.kv_snapshot()


def test_an_idle_worker_keeps_publishing_and_a_stuck_one_is_reported_stuck(tiny_llama_dir):
    """The engine thread publishes a heartbeat batch every second while idle, so an idle worker
    is never taken for stuck; once it hangs, its events stop and the feed says so."""
    config = EngineConfig(model=str(tiny_llama_dir), num_blocks=32)

    async def scenario():
        svc = DecodeService("decode-0", config, "127.0.0.1", b"s", 5.0)
        await svc.start()
        lost, stuck = [], []
        feed = KVFeed(
            RadixIndex(),
            {"decode-0": _ServiceSource(svc)},
            on_lost=lambda *a: lost.append(a),
            on_stuck=lambda *a: stuck.append(a),
            stall_timeout_s=3.0,
        )
        feed.start()
        await asyncio.sleep(5.0)  # idle for longer than the stall timeout
        assert lost == [] and stuck == []
        await svc.inject_stall(30.0)
        await _until(lambda: bool(stuck), timeout=10.0)
        [(worker_id, reason, epoch)] = stuck
        assert worker_id == "decode-0" and epoch == 0 and "heartbeat" in reason
        assert lost == []
        await feed.stop()

    asyncio.run(scenario())
