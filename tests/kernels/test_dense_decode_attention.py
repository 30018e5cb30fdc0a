"""Decode attention over the CPU engine's dense KV mirror: the native kernel and the torch path
against float64 attention, reading only each row's own positions."""

from __future__ import annotations

import pytest
import torch
from native_helpers import needs_cc

from pdserve.kernels.dense_decode_attention import (
    _native_kernel,
    dense_decode_attention,
    dense_decode_attention_ref,
)

CASES = [
    # batch, mirror rows, heads, kv heads, head dim, capacity, lens
    (4, 4, 8, 2, 64, 64, [1, 17, 64, 30]),
    (3, 8, 12, 4, 64, 512, [300, 257, 1]),
    (2, 2, 4, 4, 128, 32, [5, 32]),
    (5, 6, 6, 1, 80, 48, [48, 1, 2, 33, 47]),
]


def _mirror(
    rows: int, kv_heads: int, capacity: int, head_dim: int, lens: list[int], fill: float = 100.0
):
    """Keys and values whose positions past each row's length hold `fill`, which shows in the
    output if attention lets them in."""
    gen = torch.Generator().manual_seed(rows * capacity + head_dim)
    keys = torch.randn(rows, kv_heads, capacity, head_dim, generator=gen)
    values = torch.randn(rows, kv_heads, capacity, head_dim, generator=gen)
    for row, n in enumerate(lens):
        keys[row, :, n:] = fill
        values[row, :, n:] = fill
    keys[len(lens) :] = fill
    values[len(lens) :] = fill
    return keys, values


def _expected(q, keys, values, lens, scale):
    group = q.shape[1] // keys.shape[1]
    out = []
    for row, n in enumerate(lens):
        k = keys[row, :, :n].double().repeat_interleave(group, dim=0)  # [heads, n, d]
        v = values[row, :, :n].double().repeat_interleave(group, dim=0)
        probs = (torch.einsum("hd,hnd->hn", q[row].double(), k) * scale).softmax(-1)
        out.append(torch.einsum("hn,hnd->hd", probs, v))
    return torch.stack(out).float()


@pytest.mark.parametrize("path", [dense_decode_attention, dense_decode_attention_ref])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}h{c[2]}kv{c[3]}d{c[4]}")
def test_attention_matches_float64_and_reads_only_each_rows_positions(path, case):
    batch, rows, heads, kv_heads, head_dim, capacity, lens = case
    keys, values = _mirror(rows, kv_heads, capacity, head_dim, lens)
    q = torch.randn(batch, heads, head_dim, generator=torch.Generator().manual_seed(batch))
    scale = head_dim**-0.5
    out = path(q, keys, values, torch.tensor(lens), scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, _expected(q, keys, values, lens, scale), atol=2e-5, rtol=1e-4)


@needs_cc
def test_native_kernel_is_built_where_a_compiler_exists_and_never_reads_past_a_row():
    assert _native_kernel() is not None
    batch, rows, heads, kv_heads, head_dim, capacity, lens = CASES[1]
    keys, values = _mirror(rows, kv_heads, capacity, head_dim, lens, fill=float("nan"))
    q = torch.randn(batch, heads, head_dim)
    out = dense_decode_attention(q, keys, values, torch.tensor(lens), 0.125)
    torch.testing.assert_close(out, _expected(q, keys, values, lens, 0.125), atol=2e-5, rtol=1e-4)


def test_a_bfloat16_mirror_takes_the_torch_path_and_keeps_the_dtype():
    keys, values = _mirror(2, 2, 16, 64, [3, 16])
    q = torch.randn(2, 4, 64)
    lens = torch.tensor([3, 16])
    out = dense_decode_attention(q.bfloat16(), keys.bfloat16(), values.bfloat16(), lens, 0.125)
    assert out.dtype == torch.bfloat16
    expected = _expected(
        q.bfloat16().float(), keys.bfloat16().float(), values.bfloat16().float(), [3, 16], 0.125
    )
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


@needs_cc
@pytest.mark.parametrize(
    "lens, match",
    [([0, 4], "lens must lie in"), ([4, 17], "lens must lie in"), ([4], "do not fit")],
)
def test_lengths_outside_the_mirror_are_refused_before_any_read(lens, match):
    keys, values = _mirror(2, 2, 16, 64, [16, 16])
    with pytest.raises(ValueError, match=match):
        dense_decode_attention(torch.randn(2, 4, 64), keys, values, torch.tensor(lens), 0.125)


def test_values_that_do_not_match_the_keys_are_refused():
    keys, values = _mirror(2, 2, 16, 64, [16, 16])
    with pytest.raises(ValueError, match="do not fit"):
        dense_decode_attention(torch.randn(2, 4, 64), keys, values[:1], torch.tensor([3, 4]), 0.1)
