"""The disaggregated path end to end: gRPC router, Ray prefill and decode workers, KV over gloo."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch
from cluster_helpers import kv_bytes, wait_until_idle, worker_status
from engine_helpers import hf_greedy
from grpc_health.v1 import health_pb2
from grpc_helpers import generate_status, health_status, malformed_requests
from hypothesis import HealthCheck, given, settings
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def _prompts(n: int, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (3 + 23 * i,), generator=g).tolist() for i in range(n)]


def test_concurrent_clients_get_transformers_tokens_through_the_kv_channel(
    cluster, client, hf_model
):
    prompts = _prompts(16)
    before = worker_status(cluster, "decode-0")
    results: dict[int, object] = {}

    def run(i: int) -> None:
        results[i] = client.complete(
            prompts[i], max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, prompt in enumerate(prompts):
        r = results[i]
        assert r.token_ids == hf_greedy(hf_model, prompt, MAX_TOKENS), f"prompt {i}"
        assert r.finish_reason == "length"
        assert r.prompt_token_ids == prompt
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), MAX_TOKENS)
        assert r.timings["ttft_s"] > 0 and r.timings["total_s"] >= r.timings["ttft_s"]
        assert r.timings["prefill_s"] > 0
    after = wait_until_idle(cluster)["decode-0"]
    assert after.prompt_tokens_computed == before.prompt_tokens_computed, "decode prefilled"
    received = after.kv_bytes_received - before.kv_bytes_received
    assert received == kv_bytes(sum(map(len, prompts)))


def test_first_token_streams_before_the_last_is_generated(cluster, client):
    stream = client.generate(_prompts(1)[0], max_tokens=64, temperature=0, ignore_eos=True)
    first = next(stream)
    assert len(first.token_ids) >= 1 and not first.finish_reason
    still_running = worker_status(cluster, "decode-0").running
    rest = list(stream)
    assert still_running == 1
    assert rest and rest[-1].finish_reason == "length"
    assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == 64


def _wait_for(cluster, worker_id: str, predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate(worker_status(cluster, worker_id)):
        assert time.monotonic() < deadline, f"{worker_id} never reached the expected state"
        time.sleep(0.005)


def _cancelled(stream) -> grpc.StatusCode:
    stream.cancel()
    with pytest.raises(grpc.RpcError) as e:
        list(stream)
    return e.value.code()


def _assert_idle_and_serving(cluster, client, stage: str) -> None:
    for wid, s in wait_until_idle(cluster).items():
        assert s.free_blocks == s.total_blocks, f"{stage}: {wid} leaked blocks"
        assert s.running == 0 and s.waiting == 0, f"{stage}: {wid} still busy"
    assert client.complete([5, 6, 7], max_tokens=2, temperature=0).finish_reason


def _long_prompt(n: int = 1900) -> list[int]:
    """Prefilled in 256-token chunks (the test cluster's budget): several steps of transfer."""
    return torch.randint(3, 1000, (n,)).tolist()


def test_cancelling_a_queued_request_frees_every_block(cluster, client):
    running = client.generate(_long_prompt(), max_tokens=100, temperature=0, ignore_eos=True)
    _wait_for(cluster, "prefill-0", lambda s: s.running == 1)
    queued = client.generate(_long_prompt(), max_tokens=100, temperature=0, ignore_eos=True)
    _wait_for(cluster, "prefill-0", lambda s: s.waiting >= 1)
    assert _cancelled(queued) == grpc.StatusCode.CANCELLED
    assert _cancelled(running) == grpc.StatusCode.CANCELLED
    _assert_idle_and_serving(cluster, client, "queued")


def test_cancelling_mid_transfer_frees_every_block(cluster, client):
    stream = client.generate(_long_prompt(), max_tokens=100, temperature=0, ignore_eos=True)
    # a reservation on the decode worker while the prefill worker still computes chunks
    _wait_for(cluster, "decode-0", lambda s: s.waiting == 1)
    assert _cancelled(stream) == grpc.StatusCode.CANCELLED
    _assert_idle_and_serving(cluster, client, "mid-transfer")


def test_cancelling_while_decoding_frees_every_block(cluster, client):
    stream = client.generate(_prompts(2)[1], max_tokens=500, temperature=0, ignore_eos=True)
    next(stream)
    assert worker_status(cluster, "decode-0").running == 1
    assert _cancelled(stream) == grpc.StatusCode.CANCELLED
    _assert_idle_and_serving(cluster, client, "decoding")


def test_abort_rpc_stops_a_decoding_request(cluster, client):
    stream = client.generate(
        _prompts(2)[1], request_id="to-abort", max_tokens=500, temperature=0, ignore_eos=True
    )
    next(stream)
    client.abort("to-abort")
    messages = list(stream)
    assert messages[-1].finish_reason == "abort"
    for s in wait_until_idle(cluster).values():
        assert s.free_blocks == s.total_blocks and s.running == 0
    with pytest.raises(grpc.RpcError) as e:
        client.abort("to-abort")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_failed_transfer_falls_back_and_the_next_crosses_a_rebuilt_channel(
    cluster, client, hf_model
):
    import ray

    prefill = cluster.workers.prefill["prefill-0"]
    client.complete([9, 8, 7], max_tokens=1, temperature=0)  # the channel exists
    prompt = _prompts(3, seed=11)[2]
    ray.get(prefill.inject_fault.remote("decode-0", 3))
    before = worker_status(cluster, "decode-0")
    broken = client.complete(prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    assert broken.token_ids == hf_greedy(hf_model, prompt, MAX_TOKENS)
    middle = wait_until_idle(cluster)["decode-0"]
    assert middle.prompt_tokens_computed - before.prompt_tokens_computed == len(prompt)
    assert middle.transfer_fallbacks == before.transfer_fallbacks + 1

    again = client.complete(prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    assert again.token_ids == broken.token_ids
    after = wait_until_idle(cluster)["decode-0"]
    assert after.prompt_tokens_computed == middle.prompt_tokens_computed
    assert after.transfer_fallbacks == middle.transfer_fallbacks
    # the decode worker computed the prompt itself the first time: its full blocks are cached
    # there, so only the last partial block's tokens cross the rebuilt channel
    assert after.kv_bytes_received - middle.kv_bytes_received == kv_bytes(len(prompt) % 16)
    for s in wait_until_idle(cluster).values():
        assert s.free_blocks == s.total_blocks


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"top_p": 0.0}, "top_p"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_bad_requests_get_invalid_argument_naming_the_field(cluster, client, kwargs, field):
    with pytest.raises(grpc.RpcError) as e:
        client.complete([1, 2, 3], **kwargs)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()


@pytest.mark.parametrize(
    ("prompt", "field"), [([], "prompt"), ([5, 1000], "token_ids"), ([7] * 5000, "prompt")]
)
def test_bad_prompts_get_invalid_argument(cluster, client, prompt, field):
    with pytest.raises(grpc.RpcError) as e:
        client.complete(prompt, max_tokens=2)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()
    assert client.complete([5, 6], max_tokens=1, temperature=0).finish_reason


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=malformed_requests(max_tokens_cap=4))
def test_random_malformed_requests_crash_nothing_and_the_cluster_keeps_serving(cluster, raw):
    code, details = generate_status(cluster.target, raw)
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), details
    assert health_status(cluster.target, "") == health_pb2.HealthCheckResponse.SERVING


def test_cluster_is_idle_and_serving_after_the_fuzzing(cluster, client):
    for s in wait_until_idle(cluster).values():
        assert s.free_blocks == s.total_blocks and s.running == 0 and s.waiting == 0
    assert client.status().serving
    assert client.complete([5, 6, 7], max_tokens=3, temperature=0).finish_reason == "length"


def test_a_request_the_decode_pool_cannot_hold_waits_and_runs_once_blocks_free(cluster, client):
    holders = [
        client.generate(_long_prompt(1500), max_tokens=500, temperature=0, ignore_eos=True)
        for _ in range(2)
    ]
    for stream in holders:
        next(stream)  # both decode now; the router charged them 2 x 125 of the 256 blocks
    before = worker_status(cluster, "decode-0").prompt_tokens_computed
    waiting = client.generate(_long_prompt(1500), max_tokens=4)  # needs 94 blocks
    deadline = time.monotonic() + 10
    while cluster.router.num_queued != 1:
        assert time.monotonic() < deadline, "the request did not queue"
        time.sleep(0.01)
    assert client.status().inflight == 3
    # no worker has seen it yet
    assert worker_status(cluster, "decode-0").prompt_tokens_computed == before
    assert worker_status(cluster, "prefill-0").running == 0
    for stream in holders:
        _cancelled(stream)
    responses = list(waiting)
    assert responses[-1].finish_reason == "length"
    assert sum(len(r.token_ids) for r in responses) == 4
    _assert_idle_and_serving(cluster, client, "after overload")
