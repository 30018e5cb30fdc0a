"""Cache-affine continuation on a real cluster: 1 prefill + 2 decode workers, the global index,
`cache_aware` placement, conditional disaggregation and resume by id.

This module starts a cluster of its own (Ray with two `decode` resources), so it shuts Ray
down on both sides; it sorts before the modules that share the session's 1P+1D cluster.
"""

from __future__ import annotations

import threading
from collections import Counter

import grpc
import pytest
import torch
from cluster_helpers import kv_bytes, wait_until_idle
from engine_helpers import hf_greedy, make_engine, run_all
from transformers import AutoModelForCausalLM

from pdserve.api.block_hash import block_hashes, model_salt
from pdserve.api.kv_events import decode_snapshot
from pdserve.api.sampling import SamplingParams
from pdserve.cluster.config import config_from_dict

pytestmark = pytest.mark.slow

BS = 16
TURN_TOKENS = 16


@pytest.fixture(scope="module")
def affinity_cluster(tiny_llama_dir):
    import ray

    from pdserve.cluster.launcher import BackgroundCluster

    if ray.is_initialized():
        ray.shutdown()
    config = config_from_dict(
        {
            "model": str(tiny_llama_dir),
            "dtype": "float32",
            # NOTE: 24 conversations need ~620 blocks; each worker holds 128, so finished
            # conversations are evicted while the live ones keep their prefixes.
            "kv_cache": {"num_blocks": 128},
            "prefill": {"workers": 1, "token_budget": 256},
            "decode": {"workers": 2},
            "kv_transfer": {"timeout_s": 5},
            "router": {"listen": "127.0.0.1:0", "policy": "cache_aware"},
        }
    )
    running = BackgroundCluster(config).start()
    yield running
    running.stop()
    ray.shutdown()


@pytest.fixture()
def client(affinity_cluster):
    from pdserve.api.client import Client

    with Client(affinity_cluster.target) as c:
        yield c


def _tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1000, (n,), generator=g).tolist()


def _reusable(prev_prompt: list[int], prev_output: list[int]) -> int:
    """Prompt tokens of the next turn whose KV the previous turn left in full blocks (the last
    sampled token is never computed)."""
    return (len(prev_prompt) + len(prev_output) - 1) // BS * BS


def _uncached_turns(model_dir, system, tails) -> list[list[list[int]]]:
    """Every conversation's completions, turn by turn, from an engine without a prefix cache."""
    engine = make_engine(model_dir, enable_prefix_cache=False)
    params = SamplingParams(max_tokens=TURN_TOKENS, temperature=0.0, ignore_eos=True)
    prompts = [system + t[0] for t in tails]
    outputs: list[list[list[int]]] = [[] for _ in tails]
    for turn in range(len(tails[0])):
        for c, prompt in enumerate(prompts):
            engine.add_request(f"c{c}t{turn}", prompt, params)
        done = run_all(engine)
        for c in range(len(tails)):
            out = done[f"c{c}t{turn}"]
            outputs[c].append(out)
            if turn + 1 < len(tails[c]):
                prompts[c] = prompts[c] + out + tails[c][turn + 1]
    return outputs


def test_multi_turn_conversations_reuse_their_prefix_and_spread_over_decode_workers(
    affinity_cluster, client, tiny_llama_dir
):
    system = _tokens(200, 1)
    tails = [[_tokens(20 + 3 * t, 100 * c + t) for t in range(4)] for c in range(24)]
    expected = _uncached_turns(tiny_llama_dir, system, tails)
    results: dict[int, list] = {}
    todo = list(range(24))
    lock = threading.Lock()

    def converse() -> None:
        while True:
            with lock:
                if not todo:
                    return
                c = todo.pop(0)
            prompt, turns = system + tails[c][0], []
            for t in range(4):
                r = client.complete(prompt, max_tokens=TURN_TOKENS, temperature=0, ignore_eos=True)
                turns.append((prompt, r))
                if t < 3:
                    prompt = prompt + r.token_ids + tails[c][t + 1]
            results[c] = turns

    threads = [threading.Thread(target=converse) for _ in range(4)]  # 4 at a time
    for th in threads:
        th.start()
    for th in threads:
        th.join()

    reusable = cached = 0
    per_worker = Counter()
    for c in range(24):
        turns = results[c]
        assert [r.token_ids for _, r in turns] == expected[c], f"conversation {c}"
        for t, (_, r) in enumerate(turns):
            per_worker[r.decode_worker] += 1
            if t:
                prev_prompt, prev = turns[t - 1]
                reusable += _reusable(prev_prompt, prev.token_ids)
                cached += r.usage.cached_prompt_tokens
    assert cached >= 0.95 * reusable, (cached, reusable)
    assert set(per_worker) == {"decode-0", "decode-1"}
    mean = sum(per_worker.values()) / 2
    assert max(per_worker.values()) <= 1.25 * mean, per_worker


def test_a_short_new_tail_is_prefilled_on_the_decode_worker_and_a_long_one_sends_only_the_missing_blocks(  # noqa: E501
    affinity_cluster, client
):
    first = client.complete(_tokens(100, 7), max_tokens=TURN_TOKENS, temperature=0)
    home = first.decode_worker
    history = first.prompt_token_ids + first.token_ids
    held = _reusable(first.prompt_token_ids, first.token_ids)
    before = wait_until_idle(affinity_cluster)

    short = history + _tokens(30, 8)
    r = client.complete(short, max_tokens=4, temperature=0)
    after = wait_until_idle(affinity_cluster)
    assert (r.prefill_worker, r.decode_worker) == ("", home)
    assert r.usage.cached_prompt_tokens == held
    assert r.timings["prefill_s"] > 0 and r.timings["transfer_s"] == 0
    computed = after[home].prompt_tokens_computed - before[home].prompt_tokens_computed
    assert computed == len(short) - held
    assert after["prefill-0"].prompt_tokens_computed == before["prefill-0"].prompt_tokens_computed
    assert after[home].kv_bytes_received == before[home].kv_bytes_received

    long = history + _tokens(300, 9)
    r = client.complete(long, max_tokens=4, temperature=0)
    final = wait_until_idle(affinity_cluster)
    assert (r.prefill_worker, r.decode_worker) == ("prefill-0", home)
    # transfer_s spans the first chunk sent to the last landed, so it covers the prefill of
    # the later layers (milliseconds here), not the few microseconds of a final flush
    assert r.timings["prefill_s"] > 0 and 1e-3 < r.timings["transfer_s"] < r.timings["ttft_s"]
    # the decode worker held `held` tokens of the prompt: exactly the rest crossed the channel
    received = final[home].kv_bytes_received - after[home].kv_bytes_received
    assert received == kv_bytes(len(long) - held)
    blocks = final[home].kv_blocks_received - after[home].kv_blocks_received
    assert blocks == -(-len(long) // BS) - held // BS


def test_cache_hits_on_either_worker_match_transformers(affinity_cluster, client, tiny_llama_dir):
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    base = _tokens(150, 12)
    # pinned, so the prefill worker computes (and caches) it though the prompt is short
    client.complete(base, max_tokens=1, temperature=0, prefill_worker="prefill-0")
    # a long new tail: prefill worker hit, KV crosses the channel
    on_prefill = base + _tokens(280, 13)
    r = client.complete(on_prefill, max_tokens=24, temperature=0, ignore_eos=True)
    assert r.prefill_worker == "prefill-0" and r.usage.cached_prompt_tokens >= 144
    assert r.token_ids == hf_greedy(hf, on_prefill, 24)
    # a short new tail on the same conversation: decode worker hit, local prefill
    on_decode = on_prefill + r.token_ids + _tokens(10, 14)
    r2 = client.complete(on_decode, max_tokens=24, temperature=0, ignore_eos=True)
    assert r2.prefill_worker == "" and r2.usage.cached_prompt_tokens >= len(on_prefill) // BS * BS
    assert r2.token_ids == hf_greedy(hf, on_decode, 24)


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "seed": 77}])
def test_resume_from_continues_exactly_where_the_request_stopped(client, sampling):
    prompt = _tokens(40, 15)
    whole = client.complete(prompt, max_tokens=64, ignore_eos=True, **sampling)
    part = client.complete(prompt, max_tokens=20, ignore_eos=True, request_id="part", **sampling)
    rest = client.complete(None, resume_from="part", max_tokens=44)
    assert part.token_ids + rest.token_ids == whole.token_ids
    assert rest.finish_reason == "length"


def test_resume_from_an_unknown_id_is_not_found(client):
    with pytest.raises(grpc.RpcError) as e:
        client.complete(None, resume_from="never-was", max_tokens=4)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "never-was" in e.value.details()


def test_the_index_agrees_with_every_worker_after_evictions(affinity_cluster, client):
    import ray

    for i in range(12):  # 12 x ~25 blocks through 128-block pools: evictions on every worker
        client.complete(_tokens(380, 200 + i), max_tokens=4, temperature=0)
    statuses = wait_until_idle(affinity_cluster)
    router = affinity_cluster.router
    for worker_id, handle in affinity_cluster.workers.all().items():
        snapshot = decode_snapshot(ray.get(handle.kv_snapshot.remote()))
        held = {b.block_hash for b in snapshot.blocks}
        assert len(held) == statuses[worker_id].cached_blocks <= 128

        async def indexed(w=worker_id):
            return router.index.blocks_of(w)

        # the snapshot call published the last batch; the index applies it within a moment
        for _ in range(100):
            if affinity_cluster.run(indexed()) == held:
                break
            threading.Event().wait(0.02)
        assert affinity_cluster.run(indexed()) == held, worker_id
    # some prompts' first blocks are gone from every decode worker: their removals reached the
    # index (which agrees with the workers above)
    salt = model_salt(affinity_cluster.config.model, "float32", BS)
    decoded = router.index.blocks_of("decode-0") | router.index.blocks_of("decode-1")
    firsts = [block_hashes(_tokens(380, 200 + i), BS, salt)[0] for i in range(12)]
    assert any(h not in decoded for h in firsts)


def test_a_request_is_validated_once(affinity_cluster, client, monkeypatch):
    """The router validates; workers only check cheap invariants (no second validation)."""
    from pdserve.router import router as router_module

    calls = []
    real = router_module.validate

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(router_module, "validate", counting)
    client.complete(_tokens(300, 400), max_tokens=3, temperature=0)  # via the prefill worker
    client.complete(_tokens(20, 401), max_tokens=3, temperature=0)  # decode prefills it
    assert len(calls) == 2
