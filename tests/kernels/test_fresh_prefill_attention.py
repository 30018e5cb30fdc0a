"""Causal attention of prompts over their own keys and values: the native kernel and SDPA
against float64 attention, prompt by prompt."""

from __future__ import annotations

import pytest
import torch
from native_helpers import needs_cc

from pdserve.kernels.fresh_prefill_attention import (
    fresh_prefill_attention,
    fresh_prefill_attention_native,
    fresh_prefill_attention_ref,
)


def _fused_qkv(lengths, heads, kv_heads, head_dim, dtype=torch.float32):
    """q, k, v as the model has them: column slices of one fused projection."""
    tokens = sum(lengths)
    gen = torch.Generator().manual_seed(tokens * heads + head_dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return (x.view(tokens, n, head_dim) for x, n in zip((q, k, v), (heads, kv_heads, kv_heads)))


def _expected(q, k, v, lengths, scale):
    group = q.shape[1] // k.shape[1]
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = (x[start : start + n].double().transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        scores = qs @ ks.transpose(1, 2) * scale  # [heads, n, n]
        scores.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out.append((scores.softmax(-1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(out).float()


CASES = [
    # prompt lengths, heads, kv heads, head dim
    ((1, 31, 32, 33, 100), 12, 4, 64),
    ((64, 64, 64), 4, 4, 128),
    ((7, 300), 8, 1, 80),
    ((129,), 6, 2, 16),
]


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(fresh_prefill_attention_native, marks=needs_cc, id="native"),
        pytest.param(fresh_prefill_attention_ref, id="sdpa"),
    ],
)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c[0])}p-h{c[1]}kv{c[2]}d{c[3]}")
def test_each_token_attends_causally_over_its_own_prompt(path, case):
    lengths, heads, kv_heads, head_dim = case
    q, k, v = _fused_qkv(lengths, heads, kv_heads, head_dim)
    scale = head_dim**-0.5
    out = path(q, k, v, lengths, scale)
    assert out is not None and out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, _expected(q, k, v, lengths, scale), atol=2e-5, rtol=1e-4)


@needs_cc
def test_shapes_the_kernel_does_not_cover_take_sdpa_with_the_same_result():
    q, k, v = _fused_qkv((5, 9), 4, 2, 72)  # a head size that is not a multiple of 16
    assert fresh_prefill_attention_native(q, k, v, (5, 9), 0.1) is None
    torch.testing.assert_close(
        fresh_prefill_attention(q, k, v, (5, 9), 0.1), _expected(q, k, v, (5, 9), 0.1)
    )
    q, k, v = _fused_qkv((5, 9), 4, 2, 64, torch.bfloat16)
    assert fresh_prefill_attention_native(q, k, v, (5, 9), 0.1) is None
    assert fresh_prefill_attention(q, k, v, (5, 9), 0.1).dtype == torch.bfloat16


@pytest.mark.parametrize("attend", [fresh_prefill_attention, fresh_prefill_attention_native])
def test_lengths_that_do_not_add_up_to_the_tokens_are_refused(attend):
    q, k, v = _fused_qkv((5, 9), 4, 2, 64)
    with pytest.raises(ValueError, match="do not fit"):
        attend(q, k, v, (5, 10), 0.1)
    with pytest.raises(ValueError, match="do not fit"):
        attend(q, k[:13], v[:13], (5, 9), 0.1)


def test_an_empty_batch_gives_an_empty_result():
    q, k, v = _fused_qkv((), 4, 2, 64)
    assert fresh_prefill_attention(q, k, v, (), 0.1).shape == (0, 4, 64)
