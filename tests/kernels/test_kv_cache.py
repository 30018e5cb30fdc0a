from __future__ import annotations

import pytest
import torch
from native_helpers import needs_cc

from pdserve.kernels.kv_cache import (
    gather_kv_rows,
    gather_kv_rows_native,
    gather_kv_rows_ref,
    write_kv_cache_native,
    write_kv_cache_ref,
    write_kv_cache_triton,
)

pytestmark = pytest.mark.kernels

SLOTS = [0, 5, 17, -1, 33, 100, 127, -1, 64, 2]


def _layers(dtype: torch.dtype, head_dim: int, device: torch.device) -> torch.Tensor:
    """A 2-layer KV tensor ``[layers, 2, blocks, KVH, block_size, D]``, zero-filled."""
    return torch.zeros(2, 2, 8, 3, 16, head_dim, dtype=dtype, device=device)


def _new_kv(
    dtype: torch.dtype, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(len(SLOTS), 3, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(len(SLOTS), 3, head_dim, generator=gen).to(device, dtype)
    return k, v


def _native(k, v, k_cache, v_cache, slots):
    assert write_kv_cache_native(k, v, k_cache, v_cache, slots), "the native kernel declined"


@pytest.mark.parametrize(
    "write",
    [write_kv_cache_ref, write_kv_cache_triton, pytest.param(_native, marks=needs_cc)],
    ids=["ref", "triton", "native"],
)
def test_write_stores_each_token_at_its_slot_and_skips_negative_slots(write, device):
    kv = _layers(torch.float32, 64, device)
    k, v = _new_kv(torch.float32, 64, device)
    write(k, v, kv[1, 0], kv[1, 1], torch.tensor(SLOTS, device=device))
    flat_k = kv[1, 0].transpose(1, 2).reshape(-1, 3, 64)
    flat_v = kv[1, 1].transpose(1, 2).reshape(-1, 3, 64)
    for t, slot in enumerate(SLOTS):
        if slot >= 0:
            assert torch.equal(flat_k[slot], k[t]) and torch.equal(flat_v[slot], v[t])
    written = torch.zeros(flat_k.shape[0], dtype=torch.bool, device=device)
    written[[s for s in SLOTS if s >= 0]] = True
    assert not flat_k[~written].any() and not flat_v[~written].any()
    assert not kv[0].any(), "another layer was written"


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
def test_triton_write_equals_reference(dtype, head_dim, device):
    expected, actual = _layers(dtype, head_dim, device), _layers(dtype, head_dim, device)
    k, v = _new_kv(dtype, head_dim, device)
    slots = torch.tensor(SLOTS, device=device)
    write_kv_cache_ref(k, v, expected[0, 0], expected[0, 1], slots)
    write_kv_cache_triton(k, v, actual[0, 0], actual[0, 1], slots)
    assert torch.equal(actual, expected)


def test_triton_write_reads_strided_keys_from_fused_qkv(device):
    qkv = torch.randn(len(SLOTS), (4 + 3 + 3) * 64, device=device)
    k = qkv[:, 4 * 64 : 7 * 64].view(len(SLOTS), 3, 64)
    v = qkv[:, 7 * 64 :].view(len(SLOTS), 3, 64)
    expected, actual = _layers(torch.float32, 64, device), _layers(torch.float32, 64, device)
    slots = torch.tensor(SLOTS, device=device)
    write_kv_cache_ref(k, v, expected[0, 0], expected[0, 1], slots)
    write_kv_cache_triton(k, v, actual[0, 0], actual[0, 1], slots)
    assert torch.equal(actual, expected)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_write_equals_reference_for_fused_qkv_slices(dtype):
    qkv = torch.randn(len(SLOTS), (4 + 3 + 3) * 80).to(dtype)
    k = qkv[:, 4 * 80 : 7 * 80].view(len(SLOTS), 3, 80)
    v = qkv[:, 7 * 80 :].view(len(SLOTS), 3, 80)
    expected, actual = _layers(dtype, 80, "cpu"), _layers(dtype, 80, "cpu")
    slots = torch.tensor(SLOTS)
    write_kv_cache_ref(k, v, expected[1, 0], expected[1, 1], slots)
    _native(k, v, actual[1, 0], actual[1, 1], slots)
    assert torch.equal(actual, expected)


@needs_cc
def test_native_write_refuses_a_slot_past_the_cache_before_writing_anything():
    kv = _layers(torch.float32, 64, "cpu")
    k, v = _new_kv(torch.float32, 64, "cpu")
    with pytest.raises(IndexError, match="past the cache's last slot"):
        write_kv_cache_native(k, v, kv[0, 0], kv[0, 1], torch.tensor(SLOTS[:-1] + [8 * 16]))
    assert not kv.any()


def test_native_write_declines_mixed_dtypes():
    kv = _layers(torch.bfloat16, 64, "cpu")
    k, v = _new_kv(torch.float32, 64, "cpu")
    assert not write_kv_cache_native(k, v, kv[0, 0], kv[0, 1], torch.tensor(SLOTS))
    assert not kv.any()


@needs_cc
def test_native_write_declines_caches_of_different_shapes_and_writes_nothing():
    kv = _layers(torch.float32, 64, "cpu")
    k, v = _new_kv(torch.float32, 64, "cpu")
    short_v_cache = kv[0, 1, :4]  # fewer blocks than the key cache: slots past it would overflow
    assert not write_kv_cache_native(k, v, kv[0, 0], short_v_cache, torch.tensor(SLOTS))
    assert not write_kv_cache_native(k, v[:-1], kv[0, 0], kv[0, 1], torch.tensor(SLOTS))
    assert not kv.any()


def _gather_case(dtype=torch.float32):
    """A paged cache of distinct values, three sequences' block tables (out of order, one
    sequence cut mid-block, one empty) and a NaN mirror whose rows they fill out of order."""
    cache = torch.randn(2, 2, 12, 3, 4, 8).to(dtype)  # 2 layers, 12 blocks of 4 tokens
    tables = torch.tensor([[7, 2, 9], [0, 11, 0], [5, 0, 0]], dtype=torch.int64)
    lens = torch.tensor([11, 8, 0])
    rows = torch.tensor([2, 0, 3])
    mirror = torch.full((2, 2, 4, 3, 16, 8), float("nan"), dtype=dtype)
    return cache, tables, lens, mirror, rows


def _expected_rows(cache, tables, lens, rows, mirror):
    want = mirror.clone()
    for table, n, row in zip(tables, lens.tolist(), rows.tolist()):
        for t in range(n):
            want[:, :, row, :, t] = cache[:, :, table[t // 4], :, t % 4]
        want[:, :, row, :, n:] = 0
    return want


@pytest.mark.parametrize("gather", [gather_kv_rows, gather_kv_rows_ref], ids=["dispatch", "ref"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gather_fills_each_row_from_its_blocks_and_zeroes_the_rest(gather, dtype):
    cache, tables, lens, mirror, rows = _gather_case(dtype)
    want = _expected_rows(cache, tables, lens, rows, mirror)
    gather(cache, tables, lens, mirror, rows)
    assert torch.equal(mirror[:, :, [0, 2, 3]], want[:, :, [0, 2, 3]])
    assert mirror[:, :, 1].isnan().all(), "a row no sequence fills is left alone"


@needs_cc
def test_native_gather_takes_every_dtype_it_can_copy_and_declines_other_layouts():
    for dtype in (torch.float32, torch.bfloat16):
        cache, tables, lens, mirror, rows = _gather_case(dtype)
        assert gather_kv_rows_native(cache, tables, lens, mirror, rows)
    cache, tables, lens, mirror, rows = _gather_case()
    one_plane = cache[:, :1].contiguous(), mirror[:, :1].contiguous()  # no values plane
    assert not gather_kv_rows_native(one_plane[0], tables, lens, one_plane[1], rows)
    assert not gather_kv_rows_native(cache, tables, lens, mirror.transpose(0, 1), rows)


@needs_cc
@pytest.mark.parametrize(
    "gather", [gather_kv_rows_native, gather_kv_rows_ref], ids=["native", "ref"]
)
@pytest.mark.parametrize(
    "change",
    [
        lambda t, n, r: r.__setitem__(0, 4),  # a row past the mirror
        lambda t, n, r: n.__setitem__(0, 17),  # longer than the mirror's capacity
        lambda t, n, r: n.__setitem__(1, 13),  # longer than its block table
        lambda t, n, r: t.__setitem__((0, 1), 12),  # a block past the cache
        lambda t, n, r: t.__setitem__((1, 0), -1),
        lambda t, n, r: r.__setitem__(2, 2),  # two sequences into one row
    ],
    ids=["row", "capacity", "table", "block", "negative-block", "repeated-row"],
)
def test_gather_refuses_what_does_not_fit_before_writing_anything(gather, change):
    cache, tables, lens, mirror, rows = _gather_case()
    change(tables, lens, rows)
    with pytest.raises(IndexError):
        gather(cache, tables, lens, mirror, rows)
    assert mirror.isnan().all()
