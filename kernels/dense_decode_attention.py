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
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """``q`` ``[batch, heads, head_dim]`` attends over row i of ``keys`` and ``values``
    ``[rows, kv_heads, capacity, head_dim]`` (one layer of the mirror), positions
    ``[0, lens[i])``; returns ``[batch, heads, head_dim]`` in ``q``'s dtype."""
    batch, heads, head_dim = q.shape
    rows, kv_heads, capacity, _ = keys.shape
    if (
        lens.shape != (batch,)
        or batch > rows
        or heads % kv_heads
        or values.shape != keys.shape
        or keys.shape[3] != head_dim
    ):
        raise ValueError(
            f"q {tuple(q.shape)}, keys {tuple(keys.shape)}, values {tuple(values.shape)} and "
            f"lens {tuple(lens.shape)} do not fit together"
        )
    tensors = (q, keys, values, lens)
    if (
        any(t.device.type != "cpu" for t in tensors)
        or not q.dtype == keys.dtype == values.dtype == torch.float32
        or keys.stride() != values.stride()
        or keys.stride()[2:] != (head_dim, 1)
        or (kernel := _native_kernel()) is None
    ):
        return dense_decode_attention_ref(q, keys, values, lens, scale)
    q = q.contiguous()
    lens = lens.to(torch.int64).contiguous()
    out = torch.empty_like(q)
    failed = kernel(
        q.data_ptr(),
        keys.data_ptr(),
        values.data_ptr(),
        lens.data_ptr(),
        out.data_ptr(),
        batch,
        heads,
        kv_heads,
        head_dim,
        keys.stride(0),
        keys.stride(1),
        capacity,
        scale,
        torch.get_num_threads(),
    )
    if failed == -2:
        raise ValueError(f"lens must lie in [1, {capacity}], got {lens.tolist()}")
    if failed:
        raise MemoryError("dense decode attention could not allocate its score buffer")
    return out


def dense_decode_attention_ref(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """The same in torch: the query heads of one KV head form the rows of one matmul, so each
    KV head's keys and values are read once."""
    batch, heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    n = int(lens.max()) if batch else 0
    masked = torch.arange(n, device=q.device)[None, :] >= lens[:, None]
    bias = torch.zeros(masked.shape, device=q.device).masked_fill_(masked, float("-inf"))
    flat = batch * kv_heads
    qg = (q.float() * scale).view(flat, heads // kv_heads, head_dim)
    scores = torch.bmm(qg, _rows(keys, batch, n).transpose(1, 2))
    scores = scores.view(batch, kv_heads, -1, n).add_(bias[:, None, None, :])
    probs = torch.softmax(scores, dim=-1).view(flat, -1, n)
    out = torch.bmm(probs, _rows(values, batch, n))
    return out.view(batch, heads, head_dim).to(q.dtype)


def _rows(x: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """Positions ``[0, n)`` of the first ``batch`` rows as ``[batch * kv_heads, n, head_dim]``
    float32 (a view when the mirror is float32)."""
    rows = x[:batch].flatten(0, 1)[:, :n]
    return rows if rows.dtype == torch.float32 else rows.float()


@functools.cache
def _native_kernel() -> ctypes._CFuncPtr | None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    argtypes = [ptr] * 5 + [i64] * 7 + [ctypes.c_float, ctypes.c_int]
    return native.function(
        "dense_decode_attention", "dense_decode_attention_f32", argtypes, ctypes.c_int
    )
