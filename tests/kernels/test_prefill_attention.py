from __future__ import annotations

import pytest
import torch

from pdserve.kernels.prefill_attention import prefill_attention_ref, prefill_attention_triton

pytestmark = pytest.mark.kernels

# Base case: a sequence of 17 new tokens without prefix beside a companion sequence with a
# 20-token prefix, 2 KV heads with 2 query heads each, head dim 64, fp32. Each case varies
# one dimension; half precision is its own test.
BASE = {"q_len": 17, "prefix": 0, "group": 2, "head_dim": 64, "dtype": torch.float32}

CASES = [
    BASE,
    *({**BASE, "q_len": n} for n in (1, 15, 100)),
    *({**BASE, "prefix": p} for p in (16, 45, 200)),
    *({**BASE, "group": g} for g in (1, 4, 8)),
    *({**BASE, "head_dim": d} for d in (80, 96, 128)),
]


def _batch(paged_batch, case: dict):
    return paged_batch(
        q_lens=[case["q_len"], 5],
        prefix_lens=[case["prefix"], 20],
        group=case["group"],
        head_dim=case["head_dim"],
        dtype=case["dtype"],
    )


def _run(fn, batch) -> torch.Tensor:
    return fn(
        batch.q,
        batch.k_cache,
        batch.v_cache,
        batch.block_tables,
        batch.cu_seqlens_q,
        batch.seq_lens,
        batch.scale,
    )


def _case_id(case: dict) -> str:
    dtype = str(case["dtype"]).removeprefix("torch.")
    return f"q{case['q_len']}-prefix{case['prefix']}-g{case['group']}-d{case['head_dim']}-{dtype}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_prefill_matches_reference(paged_batch, assert_close, case):
    batch = _batch(paged_batch, case)
    out = _run(prefill_attention_triton, batch)
    assert out.dtype == batch.q.dtype
    assert_close(out, _run(prefill_attention_ref, batch), case["dtype"])


@pytest.mark.parametrize("q_len, prefix", [(17, 0), (33, 40)])
def test_triton_prefill_matches_reference_in_half_precision(
    paged_batch, assert_close, half_dtype, q_len, prefix
):
    batch = _batch(paged_batch, {**BASE, "q_len": q_len, "prefix": prefix, "dtype": half_dtype})
    out = _run(prefill_attention_triton, batch)
    assert out.dtype == half_dtype
    assert_close(out, _run(prefill_attention_ref, batch), half_dtype)


@pytest.mark.parametrize(
    "case",
    [BASE, {**BASE, "prefix": 45, "group": 4}, {**BASE, "q_len": 100, "head_dim": 80}],
    ids=_case_id,
)
def test_reference_prefill_matches_dense_float64(paged_batch, dense_attention, case):
    batch = _batch(paged_batch, case)
    out = _run(prefill_attention_ref, batch)
    starts = batch.cu_seqlens_q.tolist()
    for b in range(len(batch.keys)):
        q = batch.q[starts[b] : starts[b + 1]]
        expected = dense_attention(q, batch.keys[b], batch.values[b], batch.scale)
        torch.testing.assert_close(
            out[starts[b] : starts[b + 1]].double().cpu(), expected, atol=1e-5, rtol=1e-5
        )


def test_chunked_prefill_equals_single_pass(paged_batch, assert_close, device):
    """Prefilling 40 tokens as chunks of 24 and 16 gives what one 40-token pass gives."""
    whole = paged_batch(q_lens=[40], prefix_lens=[0], group=4)
    full = _run(prefill_attention_triton, whole)
    for start, end in ((0, 24), (24, 40)):
        chunk = prefill_attention_triton(
            whole.q[start:end],
            whole.k_cache,
            whole.v_cache,
            whole.block_tables,
            torch.tensor([0, end - start], dtype=torch.int32, device=device),
            torch.tensor([end], dtype=torch.int32, device=device),
            whole.scale,
        )
        assert_close(chunk, full[start:end], torch.float32)


def test_triton_prefill_reads_strided_query_from_fused_qkv(paged_batch, assert_close, device):
    batch = paged_batch(q_lens=[17, 5], prefix_lens=[3, 20])
    num_tokens, num_heads, head_dim = batch.q.shape
    qkv = torch.randn(num_tokens, (num_heads + 4) * head_dim, device=device)
    qkv[:, : num_heads * head_dim] = batch.q.flatten(1)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    out = prefill_attention_triton(
        q,
        batch.k_cache,
        batch.v_cache,
        batch.block_tables,
        batch.cu_seqlens_q,
        batch.seq_lens,
        batch.scale,
    )
    assert_close(out, _run(prefill_attention_ref, batch), torch.float32)


def test_prefill_skips_sequences_without_new_tokens(paged_batch, assert_close):
    batch = paged_batch(q_lens=[0, 9], prefix_lens=[30, 7])
    out = _run(prefill_attention_triton, batch)
    assert out.shape == (9, 4, 64)
    assert_close(out, _run(prefill_attention_ref, batch), torch.float32)
