"""Decode attention over the CPU engine's dense KV mirror (`engine/dense_kv.py`): the native
kernel of `csrc/dense_decode_attention.c`, or batched matmuls in torch.

NOTE: measured on the 2-core EPYC VM (2026-11-30), one decode step's attention at batch 32,
12 layers of 77M-shaped KV (4 KV heads x 64, ~320 positions, 236 MB): torch's SDPA 19.5-22 ms,
the batched matmuls below 18 ms, the native kernel 11.4 ms (the DRAM floor is 10.5 ms); the
tiny model's 4 layers: 1.4-2.4, 1.1-1.3 and 0.55 ms.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from pdserve.kernels import native


def dense_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Decode row i stores its new ``k[i]``, ``v[i]`` ``[kv_heads, head_dim]`` at position
    ``lens[i] - 1`` of row ``rows[i]`` of ``keys`` and ``values`` ``[num_rows, kv_heads,
    capacity, head_dim]`` (one layer of the mirror), then its ``q[i]`` ``[heads, head_dim]``
    attends over that row's positions ``[0, lens[i])``; returns ``[batch, heads, head_dim]`` in
    ``q``'s dtype. Rows must be distinct."""
    batch, heads, head_dim = q.shape
    num_rows, kv_heads, capacity, _ = keys.shape
    if (
        k.shape != (batch, kv_heads, head_dim)
        or v.shape != k.shape
        or rows.shape != (batch,)
        or lens.shape != (batch,)
        or heads % kv_heads
        or values.shape != keys.shape
        or keys.shape[3] != head_dim
    ):
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, keys "
            f"{tuple(keys.shape)}, values {tuple(values.shape)}, rows {tuple(rows.shape)} and "
            f"lens {tuple(lens.shape)} do not fit together"
        )
    tensors = (q, k, v, keys, values, rows, lens)
    if (
        any(t.device.type != "cpu" for t in tensors)
        or any(t.dtype != torch.float32 for t in (q, k, v, keys, values))
        or k.stride()[1:] != (head_dim, 1)
        or v.stride()[1:] != (head_dim, 1)
        or keys.stride() != values.stride()
        or keys.stride()[2:] != (head_dim, 1)
        or (kernel := _native_kernel()) is None
    ):
        return dense_decode_attention_ref(q, k, v, keys, values, rows, lens, scale)
    q = q.contiguous()
    rows = rows.to(torch.int64).contiguous()
    lens = lens.to(torch.int64).contiguous()
    out = torch.empty(q.shape, dtype=torch.float32, device="cpu")
    failed = kernel(
        q.data_ptr(),
        k.data_ptr(),
        k.stride(0),
        v.data_ptr(),
        v.stride(0),
        keys.data_ptr(),
        values.data_ptr(),
        rows.data_ptr(),
        lens.data_ptr(),
        out.data_ptr(),
        batch,
        heads,
        kv_heads,
        head_dim,
        num_rows,
        keys.stride(0),
        keys.stride(1),
        capacity,
        scale,
        torch.get_num_threads(),
    )
    if failed == -2:
        raise _out_of_range(rows, lens, num_rows, capacity)
    if failed:
        raise MemoryError("dense decode attention could not allocate its score buffer")
    return out


def dense_decode_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    rows: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The same in torch: the query heads of one KV head form the rows of one matmul, so each
    KV head's keys and values are read once."""
    batch, heads, head_dim = q.shape
    num_rows, kv_heads, capacity, _ = keys.shape
    if batch and (
        int(rows.min()) < 0
        or int(rows.max()) >= num_rows
        or rows.unique().numel() != batch
        or int(lens.min()) < 1
        or int(lens.max()) > capacity
    ):
        raise _out_of_range(rows, lens, num_rows, capacity)
    keys[rows, :, lens - 1] = k.to(keys.dtype)
    values[rows, :, lens - 1] = v.to(values.dtype)
    n = int(lens.max()) if batch else 0
    masked = torch.arange(n, device=q.device)[None, :] >= lens[:, None]
    bias = torch.zeros(masked.shape, device=q.device).masked_fill_(masked, float("-inf"))
    flat = batch * kv_heads
    qg = (q.float() * scale).view(flat, heads // kv_heads, head_dim)
    scores = torch.bmm(qg, _rows(keys, rows, n).transpose(1, 2))
    scores = scores.view(batch, kv_heads, -1, n).add_(bias[:, None, None, :])
    probs = torch.softmax(scores, dim=-1).view(flat, -1, n)
    out = torch.bmm(probs, _rows(values, rows, n))
    return out.view(batch, heads, head_dim).to(q.dtype)


def _out_of_range(
    rows: torch.Tensor, lens: torch.Tensor, num_rows: int, capacity: int
) -> ValueError:
    return ValueError(
        f"rows must be distinct and lie in [0, {num_rows}), and lens in [1, {capacity}]; got "
        f"rows {rows.tolist()} and lens {lens.tolist()}"
    )


def _rows(x: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """Positions ``[0, n)`` of mirror rows ``rows`` as ``[len(rows) * kv_heads, n, head_dim]``
    float32 (a view when the rows are the mirror's first ones in order, as they mostly are)."""
    batch = rows.numel()
    in_order = torch.equal(rows, torch.arange(batch, device=rows.device))
    picked = x[:batch] if in_order else x.index_select(0, rows)
    return picked[:, :, :n].flatten(0, 1).float()


@functools.cache
def _native_kernel() -> ctypes._CFuncPtr | None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    argtypes = [ptr, ptr, i64, ptr, i64] + [ptr] * 5 + [i64] * 8 + [ctypes.c_float, ctypes.c_int]
    return native.function(
        "dense_decode_attention", "dense_decode_attention_f32", argtypes, ctypes.c_int
    )
