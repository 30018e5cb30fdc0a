"""A tensor-parallel engine (2 ranks in 2 processes over real gloo) decodes exactly like one
rank and like transformers, each rank holds about half the weights, and the group's sockets
listen on the address it is given."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import GREEDY, generate, hf_greedy, make_engine, tp_generate, tp_listening
from transformers import AutoModelForCausalLM

MAX_TOKENS = GREEDY.max_tokens


@pytest.fixture(params=["tiny_llama_dir", "tiny_qwen2_dir", "tiny_mqa_dir"])
def model_dir(request):
    """Split KV heads (Llama: 2 over 2 ranks; Qwen2: 4, with q/k/v bias and tied embeddings)
    and replicated ones (1 KV head)."""
    return request.getfixturevalue(request.param)


def _prompts(vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """A first batch, and a second whose prompts extend the first's (prefix-cache hits)."""
    g = torch.Generator().manual_seed(99)
    first = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 40, 70)]
    second = [first[1] + [7, 8, 9], first[2][:48] + [11] * 20]
    return first, second


def test_tp2_greedy_matches_tp1_and_transformers(model_dir):
    engine = make_engine(model_dir, max_num_batched_tokens=32)  # chunked prefill too
    first, second = _prompts(engine.model_config.vocab_size)
    tp1 = [generate(engine, first), generate(engine, second)]
    assert engine.stats().prompt_tokens_cached >= 64, "the second batch must hit the cache"
    tp2, _ = tp_generate(model_dir, 2, [first, second], max_num_batched_tokens=32)
    assert tp2 == tp1
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, got in zip(first + second, tp1[0] + tp1[1]):
        assert got == hf_greedy(hf, prompt, MAX_TOKENS)


def test_tp2_rank_holds_half_the_weights_and_kv_heads(tiny_llama_dir):
    tp1 = make_engine(tiny_llama_dir)
    _, memory = tp_generate(tiny_llama_dir, 2, [])
    for weights, kv in memory:
        assert weights == pytest.approx(tp1.weight_bytes / 2, rel=0.1)
        assert kv == tp1.kv_cache_bytes // 2  # 1 of 2 KV heads per rank, same blocks


def test_tp_group_listens_on_the_given_address_only():
    # NOTE: not the address the machine's host name resolves to (where gloo's default device
    # listens): 127.0.0.2 is loopback too, on Linux.
    host = "127.0.0.2"
    for rank, addresses in enumerate(tp_listening(2, host)):
        assert addresses, f"rank {rank} listens on nothing"
        assert all(a.startswith(f"{host}:") for a in addresses), (rank, addresses)
