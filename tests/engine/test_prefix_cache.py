"""The prefix cache: reuse of computed prompt blocks, in the tree and through the engine."""

from __future__ import annotations

import torch
from engine_helpers import GREEDY, generate, hf_greedy, make_engine, run_all
from transformers import AutoModelForCausalLM

from pdserve.api.block_hash import block_hashes
from pdserve.api.kv_events import BlockRemoved, BlockStored
from pdserve.engine.kv_pool import BlockPool
from pdserve.engine.prefix_cache import PrefixCache

BS = 16


def _tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1000, (n,), generator=g).tolist()


def _cache_chain(cache: PrefixCache, pool: BlockPool, hashes: list[int]):
    """Caches a chain as a finished sequence would: extend block by block, then unlock."""
    node = None
    for h in hashes:
        (block,) = pool.allocate(1)
        node = cache.extend(node, h, block)
        pool.free([block])  # the sequence's own reference goes; the tree's stays
    cache.unlock(node)
    return node


def test_cache_matches_the_longest_cached_chain_and_evicts_unlocked_leaves_oldest_first():
    pool = BlockPool(8)
    cache = PrefixCache(pool)
    a = block_hashes(_tokens(64, 1), BS, salt=7)
    b = a[:2] + block_hashes(_tokens(32, 2), BS, salt=7, parent=a[1])
    _cache_chain(cache, pool, a)
    _cache_chain(cache, pool, b)
    assert cache.num_blocks == 6 and cache.num_evictable == 6 and pool.num_free == 2
    assert len(cache.match(a)) == 4 and len(cache.match(b)) == 4
    assert len(cache.match(a[:1] + b[2:])) == 1

    cache.lock(cache.match(b)[-1])  # a running sequence holds b: only a's own tail may go
    assert cache.num_evictable == 2
    assert cache.evict(5) == 2
    assert cache.match(a) == cache.match(a[:2])
    events = cache.drain_events()
    assert events[:6] == [BlockStored(a[0], None), BlockStored(a[1], a[0])] + [
        BlockStored(a[2], a[1]),
        BlockStored(a[3], a[2]),
        BlockStored(b[2], b[1]),
        BlockStored(b[3], b[2]),
    ]
    assert events[6:] == [BlockRemoved(a[3]), BlockRemoved(a[2])]  # leaf first
    assert pool.num_free == 4


def test_a_shared_prefix_is_computed_once_and_outputs_equal_an_uncached_engine(tiny_llama_dir):
    system = _tokens(200, 3)
    prompts = [system + _tokens(20, 10 + i) for i in range(3)]
    cold = make_engine(tiny_llama_dir, enable_prefix_cache=False)
    expected = generate(cold, prompts)
    warm = make_engine(tiny_llama_dir)
    assert generate(warm, prompts[:1]) == expected[:1]
    outs = generate(warm, prompts[1:])
    assert outs == expected[1:]
    stats = warm.stats()
    # 200 shared tokens are 12 full blocks: the later prompts reuse 192 tokens each.
    assert stats.prompt_tokens_cached == 2 * 192
    assert stats.prompt_tokens_computed == 3 * 220 - 2 * 192
    assert stats.requests_total == 3


def test_a_cache_hit_matches_transformers(tiny_llama_dir):
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    engine = make_engine(tiny_llama_dir)
    first = _tokens(100, 4)
    engine.add_request("a", first, GREEDY)
    out = run_all(engine)
    follow_up = first + out["a"] + _tokens(30, 5)  # the next turn of a chat
    engine.add_request("b", follow_up, GREEDY)
    outs = run_all(engine)
    assert engine.stats().prompt_tokens_cached == (len(first) + 64) // BS * BS
    assert outs["b"] == hf_greedy(hf, follow_up, 64)


def test_a_request_reuses_blocks_of_one_still_running(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    shared = _tokens(64, 6)
    engine.add_request("long", shared + _tokens(5, 7), GREEDY)
    engine.step()  # "long" has computed its prompt and is decoding
    engine.add_request("late", shared + _tokens(9, 8), GREEDY)
    outs = run_all(engine)
    assert engine.stats().prompt_tokens_cached == 64
    cold = make_engine(tiny_llama_dir, enable_prefix_cache=False)
    assert generate(cold, [shared + _tokens(9, 8)]) == [outs["late"]]


def test_eviction_under_memory_pressure_keeps_outputs_and_reports_removals(tiny_llama_dir):
    prompts = [_tokens(48, 20 + i) + _tokens(40, 30 + i) for i in range(8)]
    params = GREEDY.__class__(max_tokens=16, temperature=0.0, ignore_eos=True)
    cold = make_engine(tiny_llama_dir, enable_prefix_cache=False)
    expected = generate(cold, prompts, params)
    tight = make_engine(tiny_llama_dir, num_blocks=24)  # the workload needs ~56 blocks
    for _ in range(2):
        assert generate(tight, prompts, params) == expected
    events = tight.drain_kv_events()
    stored = {e.block_hash for e in events if isinstance(e, BlockStored)}
    removed = [e.block_hash for e in events if isinstance(e, BlockRemoved)]
    assert removed and set(removed) <= stored
    cached = {b.block_hash for b in tight.cached_blocks()}
    assert len(cached) == tight.stats().cached_blocks <= 24
    # replaying the events gives exactly what the cache holds
    held: set[int] = set()
    for e in events:
        if isinstance(e, BlockStored):
            held.add(e.block_hash)
        else:
            held.discard(e.block_hash)
    assert held == cached
    stats = tight.stats()
    assert stats.free_blocks == stats.total_blocks


def test_reserve_reports_the_cached_prefix_and_holds_the_rest(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir, num_blocks=32)
    prompt = _tokens(70, 9)
    generate(engine, [prompt])
    cached = engine.reserve("incoming", prompt + _tokens(10, 11), GREEDY)
    assert cached == 64
    assert len(engine.block_ids("incoming")) == 6  # 80 tokens and the first one decoded
    assert engine.stats().reserved == 1
    engine.abort("incoming")
    stats = engine.stats()
    assert stats.reserved == 0 and stats.free_blocks == stats.total_blocks


def test_landed_transfers_run_even_when_a_waiting_prompt_cannot_fit(tiny_llama_dir):
    """A transfer's blocks hold its first decoded token too, and a landed transfer joins the
    batch ahead of waiting prompts: a pool full of landed transfers always moves."""
    engine = make_engine(tiny_llama_dir, num_blocks=10)
    params = GREEDY.__class__(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine.reserve("transfer", _tokens(90, 40), params)  # 6 of the 10 blocks
    engine.add_request("local", _tokens(90, 41), params)  # needs 6: waits
    assert engine.step() == []
    first = engine.admit_prefilled("transfer", 5, None)
    assert not first.finished
    outs = run_all(engine)
    assert len(outs["transfer"]) == 7 and len(outs["local"]) == 8
    stats = engine.stats()
    assert stats.free_blocks == stats.total_blocks and stats.waiting == stats.reserved == 0
