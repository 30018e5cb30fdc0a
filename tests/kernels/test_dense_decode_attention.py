"""Decode attention over the CPU engine's dense KV mirror: the native kernel and the torch path
append each row's new token, then match float64 attention, reading only each row's own
positions."""

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
    # mirror rows of the decode rows, heads, kv heads, head dim, capacity, lens
    ([0, 1, 2, 3], 8, 2, 64, 64, [1, 17, 64, 30]),
    ([5, 0, 7], 12, 4, 64, 512, [300, 257, 1]),
    ([1, 0], 4, 4, 128, 32, [5, 32]),
    ([4, 1, 0, 2, 3], 6, 1, 80, 48, [48, 1, 2, 33, 47]),
]


def _mirror(num_rows, kv_heads, capacity, head_dim, rows, lens, fill: float = 100.0):
    """Keys and values whose positions from each row's new token on, and whole rows that no
    decode row owns, hold `fill`, which shows in the output if attention lets them in."""
    gen = torch.Generator().manual_seed(num_rows * capacity + head_dim)
    keys = torch.randn(num_rows, kv_heads, capacity, head_dim, generator=gen)
    values = torch.randn(num_rows, kv_heads, capacity, head_dim, generator=gen)
    owned = torch.zeros(num_rows, dtype=torch.bool)
    for row, n in zip(rows, lens):
        keys[row, :, n - 1 :] = fill
        values[row, :, n - 1 :] = fill
        owned[row] = True
    keys[~owned] = fill
    values[~owned] = fill
    return keys, values


def _inputs(case, fill=100.0):
    rows, heads, kv_heads, head_dim, capacity, lens = case
    num_rows = max(rows) + 2
    keys, values = _mirror(num_rows, kv_heads, capacity, head_dim, rows, lens, fill)
    gen = torch.Generator().manual_seed(len(rows))
    q = torch.randn(len(rows), heads, head_dim, generator=gen)
    k = torch.randn(len(rows), kv_heads, head_dim, generator=gen)
    v = torch.randn(len(rows), kv_heads, head_dim, generator=gen)
    return q, k, v, keys, values, torch.tensor(rows), torch.tensor(lens)


def _appended(keys, values, k, v, rows, lens):
    keys, values = keys.clone(), values.clone()
    for i, (row, n) in enumerate(zip(rows.tolist(), lens.tolist())):
        keys[row, :, n - 1] = k[i]
        values[row, :, n - 1] = v[i]
    return keys, values


def _expected(q, keys, values, rows, lens, scale):
    group = q.shape[1] // keys.shape[1]
    out = []
    for i, (row, n) in enumerate(zip(rows.tolist(), lens.tolist())):
        k = keys[row, :, :n].double().repeat_interleave(group, dim=0)  # [heads, n, d]
        v = values[row, :, :n].double().repeat_interleave(group, dim=0)
        probs = (torch.einsum("hd,hnd->hn", q[i].double(), k) * scale).softmax(-1)
        out.append(torch.einsum("hn,hnd->hd", probs, v))
    return torch.stack(out).float()


@pytest.mark.parametrize("path", [dense_decode_attention, dense_decode_attention_ref])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{len(c[0])}h{c[1]}kv{c[2]}d{c[3]}")
def test_rows_get_their_new_token_and_attention_matches_float64(path, case):
    q, k, v, keys, values, rows, lens = _inputs(case)
    want_keys, want_values = _appended(keys, values, k, v, rows, lens)
    scale = q.shape[2] ** -0.5
    out = path(q, k, v, keys, values, rows, lens, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)
    expected = _expected(q, want_keys, want_values, rows, lens, scale)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


@needs_cc
def test_native_kernel_is_built_where_a_compiler_exists_and_never_reads_past_a_row():
    assert _native_kernel() is not None
    q, k, v, keys, values, rows, lens = _inputs(CASES[1], fill=float("nan"))
    # the new token's K/V arrive strided, as views of the QKV projection's output
    qkv = torch.cat([k, v], dim=1)
    k, v = qkv[:, : k.shape[1]], qkv[:, k.shape[1] :]
    want_keys, want_values = _appended(keys, values, k, v, rows, lens)
    out = dense_decode_attention(q, k, v, keys, values, rows, lens, 0.125)
    expected = _expected(q, want_keys, want_values, rows, lens, 0.125)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_a_bfloat16_mirror_takes_the_torch_path_and_keeps_the_dtype():
    q, k, v, keys, values, rows, lens = (
        t.bfloat16() if t.is_floating_point() else t for t in _inputs(CASES[2])
    )
    want_keys, want_values = _appended(keys, values, k, v, rows, lens)
    out = dense_decode_attention(q, k, v, keys, values, rows, lens, 0.125)
    assert out.dtype == torch.bfloat16
    expected = _expected(q.float(), want_keys.float(), want_values.float(), rows, lens, 0.125)
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


@needs_cc
@pytest.mark.parametrize(
    "rows, lens, match",
    [
        ([0, 1], [0, 4], "lens in"),
        ([0, 1], [4, 17], "lens in"),
        ([0, 2], [4, 4], "rows must be distinct and lie in"),
        ([-1, 1], [4, 4], "rows must be distinct and lie in"),
        ([1, 1], [4, 4], "rows must be distinct"),
        ([0], [4, 4], "do not fit"),
    ],
)
def test_rows_and_lengths_outside_the_mirror_are_refused_before_any_write(rows, lens, match):
    keys, values = _mirror(2, 2, 16, 64, [0, 1], [16, 16])
    before = keys.clone(), values.clone()
    k = v = torch.zeros(2, 2, 64)
    with pytest.raises(ValueError, match=match):
        dense_decode_attention(
            torch.randn(2, 4, 64), k, v, keys, values, torch.tensor(rows), torch.tensor(lens), 0.1
        )
    assert torch.equal(keys, before[0]) and torch.equal(values, before[1])


def test_values_that_do_not_match_the_keys_are_refused():
    keys, values = _mirror(2, 2, 16, 64, [0, 1], [16, 16])
    k = v = torch.zeros(2, 2, 64)
    with pytest.raises(ValueError, match="do not fit"):
        dense_decode_attention(
            torch.randn(2, 4, 64),
            k,
            v,
            keys,
            values[:1],
            torch.tensor([0, 1]),
            torch.tensor([3, 4]),
            0.1,
        )
