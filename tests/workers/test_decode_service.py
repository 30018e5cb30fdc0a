"""The decode worker's service on its own event loop (no Ray): transfer bookkeeping, local
prefill, and a step loop that outlives a failed step."""

from __future__ import annotations

import asyncio

from worker_helpers import token_stream

from pdserve.api.messages import PrefillRequest
from pdserve.api.sampling import SamplingParams
from pdserve.decode_worker.service import DecodeService
from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_transfer.receiver import Incoming

PARAMS = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, seed=1)


def test_transfer_is_complete_only_when_every_layer_arrived_without_gaps():
    res = Incoming(1, "r", None, [0, 1], 20, [0, 0])
    res.record(0, 0, 16)
    res.record(1, 0, 16)
    assert not res.complete
    res.record(0, 16, 4)
    res.record(1, 17, 3)  # a gap at token 16: not counted
    assert not res.complete
    res.record(1, 0, 16)  # a preempted sender starts over; re-sent ranges do no harm
    res.record(1, 16, 4)
    assert res.complete


async def _next_deltas(stream, timeout: float = 30.0):
    deltas = {}
    while True:
        outputs = await asyncio.wait_for(anext(stream), timeout)
        for d in outputs.deltas:
            deltas.setdefault(d.attempt_id, []).append(d)
            if d.finish_reason:
                return d.attempt_id, deltas


def _corrupt(svc: DecodeService, token_id: int) -> None:
    svc.engine._scheduler.waiting[0].token_ids[1] = token_id


def test_a_failed_step_ends_its_requests_with_an_error_and_the_loop_serves_on(tiny_llama_dir):
    async def scenario():
        svc = DecodeService(
            "decode-t",
            EngineConfig(model=str(tiny_llama_dir), num_blocks=32),
            "127.0.0.1",
            b"s",
            5.0,
        )
        await svc.start()
        stream = token_stream(svc)
        bad = PrefillRequest("bad", (5, 6, 7, 8), PARAMS, "decode-t")
        # NOTE: the engine thread corrupts the request right after queueing it (no step runs
        # in between): the token id is out of range, so the forward raises.
        await svc._core.call(lambda: (svc._prefill_locally(bad, 0.0), _corrupt(svc, 10**6)))
        rid, deltas = await _next_deltas(stream)
        assert rid == "bad" and deltas["bad"][-1].finish_reason == "error"
        assert "decode step failed" in deltas["bad"][-1].error
        stats = await svc.status()
        assert stats.free_blocks == 32 and stats.running == stats.waiting == 0

        await svc.prefill_locally(PrefillRequest("good", (5, 6, 7, 8), PARAMS, "decode-t"))
        rid, deltas = await _next_deltas(stream)
        assert rid == "good" and deltas["good"][-1].finish_reason == "length"
        assert sum(len(d.token_ids) for d in deltas["good"]) == 4

    asyncio.run(scenario())


def test_local_prefill_of_a_known_request_is_ignored(tiny_llama_dir):
    async def scenario():
        svc = DecodeService(
            "decode-t",
            EngineConfig(model=str(tiny_llama_dir), num_blocks=32),
            "127.0.0.1",
            b"s",
            5.0,
        )
        await svc.start()
        stream = token_stream(svc)
        req = PrefillRequest("r", (5, 6, 7), PARAMS, "decode-t")
        assert await svc.prefill_locally(req)
        assert await svc.prefill_locally(req)
        rid, deltas = await _next_deltas(stream)
        assert rid == "r" and sum(len(d.token_ids) for d in deltas["r"]) == 4
        assert (await svc.status()).requests_total == 1

    asyncio.run(scenario())
