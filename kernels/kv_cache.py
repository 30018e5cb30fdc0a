"""Write new keys and values into their paged KV-cache slots, and gather sequences' cached
KV into rows of the CPU engine's dense mirror."""

from __future__ import annotations

import ctypes
import functools

import torch

from pdserve.kernels import native
from pdserve.kernels._triton import lazy_jit, next_pow2, tl, use_triton


def write_kv_cache_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    block_size = k_cache.shape[2]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    k_cache[blocks, :, offsets] = k.to(k_cache.dtype)
    v_cache[blocks, :, offsets] = v.to(v_cache.dtype)


@lazy_jit
def _write_kv_cache_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_ch,
    stride_cs,
    num_kv_heads,
    head_dim,
    block_size,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        block = slot // block_size
        offset = slot % block_size
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < num_kv_heads) & (d < head_dim)
        dst = block * stride_cb + h * stride_ch + offset * stride_cs + d
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(k_cache_ptr + dst, k, mask=mask)
        tl.store(v_cache_ptr + dst, v, mask=mask)


def write_kv_cache_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    _write_kv_cache_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        num_kv_heads,
        head_dim,
        k_cache.shape[2],
        BLOCK_H=next_pow2(num_kv_heads),
        BLOCK_D=next_pow2(head_dim),
    )


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``k``/``v`` ``[T, KVH, D]`` at ``slot_mapping`` ``[T]``; negative slots are skipped.

    Caches are ``[num_blocks, KVH, block_size, D]``; slot ``s`` is block ``s // block_size``,
    offset ``s % block_size``.
    """
    if use_triton(k):
        write_kv_cache_triton(k, v, k_cache, v_cache, slot_mapping)
    elif not write_kv_cache_native(k, v, k_cache, v_cache, slot_mapping):
        write_kv_cache_ref(k, v, k_cache, v_cache, slot_mapping)


def write_kv_cache_native(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> bool:
    """The C kernel of `csrc/write_kv_cache.c` on CPU; False (nothing written) where it does not
    apply: mixed dtypes, devices, shapes or layouts, or no kernel built on this machine."""
    num_tokens, num_kv_heads, head_dim = k.shape
    tensors = (k, v, k_cache, v_cache, slot_mapping)
    if (
        any(t.device.type != "cpu" for t in tensors)
        or any(t.dtype != k.dtype for t in (v, k_cache, v_cache))
        or slot_mapping.dtype != torch.int64
        or v.shape != k.shape
        or k_cache.shape != v_cache.shape
        or k_cache.dim() != 4
        or k_cache.shape[1] != num_kv_heads
        or k_cache.shape[3] != head_dim
        or slot_mapping.shape != (num_tokens,)
        or k.stride()[1:] != (head_dim, 1)
        or v.stride()[1:] != (head_dim, 1)
        or k_cache.stride() != v_cache.stride()
        or k_cache.stride()[2:] != (head_dim, 1)
        or (kernel := _native_kernel()) is None
    ):
        return False
    slot_mapping = slot_mapping.contiguous()
    block_size = k_cache.shape[2]
    failed = kernel(
        k.data_ptr(),
        k.stride(0),
        v.data_ptr(),
        v.stride(0),
        head_dim,
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k_cache.stride(0),
        k_cache.stride(1),
        slot_mapping.data_ptr(),
        num_tokens,
        num_kv_heads,
        head_dim,
        block_size,
        k_cache.shape[0] * block_size,
        k.element_size(),
        torch.get_num_threads(),
    )
    if failed:
        raise IndexError(f"slot {int(slot_mapping.max())} is past the cache's last slot")
    return True


@functools.cache
def _native_kernel() -> ctypes._CFuncPtr | None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    argtypes = [ptr, i64, ptr, i64, i64, ptr, ptr, i64, i64, ptr] + [i64] * 6 + [ctypes.c_int]
    return native.function("write_kv_cache", "write_kv_cache", argtypes, ctypes.c_int)


def gather_kv_rows(
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lens: torch.Tensor,
    mirror: torch.Tensor,
    rows: torch.Tensor,
) -> None:
    """Copies positions ``[0, lens[i])`` of sequence i's keys and values, every layer, from the
    paged ``kv_cache`` ``[layers, 2, num_blocks, KVH, block_size, D]`` through its
    ``block_tables[i]`` into row ``rows[i]`` of ``mirror`` ``[layers, 2, num_rows, KVH,
    capacity, D]``, and zeroes the row's positions from ``lens[i]`` on."""
    if not gather_kv_rows_native(kv_cache, block_tables, lens, mirror, rows):
        gather_kv_rows_ref(kv_cache, block_tables, lens, mirror, rows)


def gather_kv_rows_ref(
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lens: torch.Tensor,
    mirror: torch.Tensor,
    rows: torch.Tensor,
) -> None:
    layers, _, num_blocks, kv_heads, block_size, head_dim = kv_cache.shape
    if len(set(rows.tolist())) != len(rows):
        raise IndexError(f"rows {rows.tolist()} repeat")
    fills = []
    for table, n, row in zip(block_tables, lens.tolist(), rows.tolist()):
        blocks = table[: -(-n // block_size)].long()
        if (
            not 0 <= row < mirror.shape[2]
            or not 0 <= n <= min(mirror.shape[4], table.numel() * block_size)
            or (blocks.numel() and not 0 <= int(blocks.min()) <= int(blocks.max()) < num_blocks)
        ):
            raise IndexError(
                f"row {row} of length {n} does not fit the mirror, or its block "
                f"table {table.tolist()} points outside the cache"
            )
        fills.append((blocks, n, row))
    for blocks, n, row in fills:
        src = kv_cache.index_select(2, blocks).transpose(2, 3)  # [L, 2, KVH, nb, bs, D]
        positions = src.reshape(layers, 2, kv_heads, blocks.numel() * block_size, head_dim)
        mirror[:, :, row, :, :n] = positions[..., :n, :]
        mirror[:, :, row, :, n:] = 0


def gather_kv_rows_native(
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lens: torch.Tensor,
    mirror: torch.Tensor,
    rows: torch.Tensor,
) -> bool:
    """The C kernel of `csrc/gather_kv_rows.c` on CPU; False (nothing written) where it does not
    apply: mixed dtypes or devices, shapes or layouts it does not cover, or no kernel built."""
    n = rows.shape[0]
    if (
        any(t.device.type != "cpu" for t in (kv_cache, block_tables, lens, mirror, rows))
        or mirror.dtype != kv_cache.dtype
        or any(t.dtype != torch.int64 for t in (block_tables, lens, rows))
        or kv_cache.dim() != 6
        or mirror.dim() != 6
        or kv_cache.shape[1] != 2
        or kv_cache.shape[4] < 1
        or mirror.shape[:2] != kv_cache.shape[:2]
        or mirror.shape[3] != kv_cache.shape[3]
        or mirror.shape[5] != kv_cache.shape[5]
        or block_tables.dim() != 2
        or block_tables.shape[0] != n
        or lens.shape != (n,)
        or not all(t.is_contiguous() for t in (kv_cache, block_tables, lens, mirror, rows))
        or (kernel := _gather_kernel()) is None
    ):
        return False
    layers, _, num_blocks, kv_heads, block_size, head_dim = kv_cache.shape
    failed = kernel(
        kv_cache.data_ptr(),
        mirror.data_ptr(),
        block_tables.data_ptr(),
        block_tables.shape[1],
        lens.data_ptr(),
        rows.data_ptr(),
        n,
        layers,
        num_blocks,
        kv_heads,
        block_size,
        head_dim,
        mirror.shape[2],
        mirror.shape[4],
        kv_cache.element_size(),
        torch.get_num_threads(),
    )
    if failed == -2:
        raise MemoryError("gather_kv_rows could not allocate its row check")
    if failed:
        raise IndexError(
            f"rows {rows.tolist()} of lengths {lens.tolist()} do not fit the mirror, repeat, or "
            "have block tables that point outside the cache"
        )
    return True


@functools.cache
def _gather_kernel() -> ctypes._CFuncPtr | None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    argtypes = [ptr, ptr, ptr, i64, ptr, ptr] + [i64] * 9 + [ctypes.c_int]
    return native.function("gather_kv_rows", "gather_kv_rows", argtypes, ctypes.c_int)
