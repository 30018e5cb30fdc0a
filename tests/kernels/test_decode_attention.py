from __future__ import annotations

import pytest
import torch

from pdserve.kernels.decode_attention import decode_attention_ref, decode_attention_triton
from pdserve.kernels.prefill_attention import prefill_attention_ref

pytestmark = pytest.mark.kernels

# Base case: a 17-token context beside a 40-token companion, 2 KV heads with 2 query heads
# each, head dim 64, fp32, split plan chosen by the launcher. Each case varies one
# dimension; half precision is its own test.
BASE = {"seq_len": 17, "group": 2, "head_dim": 64, "dtype": torch.float32, "splits": None}

CASES = [
    BASE,
    *({**BASE, "seq_len": n} for n in (1, 15, 100)),
    *({**BASE, "group": g} for g in (1, 4, 8)),
    *({**BASE, "head_dim": d} for d in (80, 96, 128)),
    *({**BASE, "splits": s, "seq_len": 100} for s in (1, 2, 4)),
    {**BASE, "splits": 4, "seq_len": 300},
]


def _batch(paged_batch, case: dict):
    """One query per sequence: the last token of each context."""
    return paged_batch(
        q_lens=[1, 1],
        prefix_lens=[case["seq_len"] - 1, 39],
        group=case["group"],
        head_dim=case["head_dim"],
        dtype=case["dtype"],
    )


def _run(fn, batch, **kwargs) -> torch.Tensor:
    return fn(
        batch.q,
        batch.k_cache,
        batch.v_cache,
        batch.block_tables,
        batch.seq_lens,
        batch.scale,
        **kwargs,
    )


def _case_id(case: dict) -> str:
    dtype = str(case["dtype"]).removeprefix("torch.")
    splits = case["splits"] or "auto"
    return f"len{case['seq_len']}-g{case['group']}-d{case['head_dim']}-{dtype}-splits{splits}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_decode_matches_reference(paged_batch, assert_close, case):
    batch = _batch(paged_batch, case)
    out = _run(decode_attention_triton, batch, num_splits=case["splits"])
    assert out.dtype == batch.q.dtype
    assert_close(out, _run(decode_attention_ref, batch), case["dtype"])


@pytest.mark.parametrize("seq_len", [17, 100])
def test_triton_decode_matches_reference_in_half_precision(
    paged_batch, assert_close, half_dtype, seq_len
):
    batch = _batch(paged_batch, {**BASE, "seq_len": seq_len, "dtype": half_dtype})
    out = _run(decode_attention_triton, batch, num_splits=2)
    assert out.dtype == half_dtype
    assert_close(out, _run(decode_attention_ref, batch), half_dtype)


@pytest.mark.parametrize(
    "case",
    [BASE, {**BASE, "seq_len": 100, "group": 8}, {**BASE, "seq_len": 1, "head_dim": 96}],
    ids=_case_id,
)
def test_reference_decode_matches_dense_float64(paged_batch, dense_attention, case):
    batch = _batch(paged_batch, case)
    out = _run(decode_attention_ref, batch)
    for b in range(len(batch.keys)):
        expected = dense_attention(batch.q[b : b + 1], batch.keys[b], batch.values[b], batch.scale)
        torch.testing.assert_close(out[b].double().cpu(), expected[0], atol=1e-5, rtol=1e-5)


def test_decode_equals_last_row_of_prefill(paged_batch, assert_close):
    """Decoding the last token gives what prefilling the whole sequence gives for it."""
    batch = paged_batch(q_lens=[50], prefix_lens=[0], group=4)
    prefill = prefill_attention_ref(
        batch.q,
        batch.k_cache,
        batch.v_cache,
        batch.block_tables,
        batch.cu_seqlens_q,
        batch.seq_lens,
        batch.scale,
    )
    decode = decode_attention_triton(
        batch.q[-1:],
        batch.k_cache,
        batch.v_cache,
        batch.block_tables,
        batch.seq_lens,
        batch.scale,
        num_splits=2,
    )
    assert_close(decode[0], prefill[-1], torch.float32)


def test_short_sequences_in_a_table_planned_for_long_ones_match_reference(
    paged_batch, assert_close
):
    """A CUDA graph's block table is as wide as the longest context: each sequence splits its
    own length, so a 17- and a 40-token context under a 64-block plan still come out right."""
    batch = _batch(paged_batch, BASE)
    wide = torch.zeros(2, 64, dtype=batch.block_tables.dtype, device=batch.block_tables.device)
    wide[:, : batch.block_tables.shape[1]] = batch.block_tables
    out = decode_attention_triton(
        batch.q, batch.k_cache, batch.v_cache, wide, batch.seq_lens, batch.scale, num_splits=4
    )
    assert_close(out, _run(decode_attention_ref, batch), torch.float32)
