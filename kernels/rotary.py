"""Rotary position embedding (Hugging Face ``rotate_half`` / NeoX style) and its cos/sin table."""

from __future__ import annotations

import ctypes
import functools
import math
from typing import Any

import torch

from pdserve.kernels import native
from pdserve.kernels._triton import lazy_jit, next_pow2, tl, use_triton


def _scaled_inv_freq(inv_freq: torch.Tensor, rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    """Apply ``rope_scaling`` exactly as transformers' ``ROPE_INIT_FUNCTIONS`` do."""
    if rope_scaling is None:
        return inv_freq
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / rope_scaling["factor"]
    if rope_type == "llama3":
        factor = rope_scaling["factor"]
        low_freq_factor = rope_scaling["low_freq_factor"]
        high_freq_factor = rope_scaling["high_freq_factor"]
        old_context_len = rope_scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor
        )
        smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium_freq, smoothed, inv_freq_llama)
    raise ValueError(
        f"rope_scaling.rope_type {rope_type!r} is not supported (default, linear, llama3)"
    )


def rope_cos_sin_cache(
    head_dim: int,
    max_positions: int,
    theta: float,
    rope_scaling: dict[str, Any] | None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[max_positions, head_dim]`` rows of ``cat(cos(pos * inv_freq), sin(pos * inv_freq))``.

    Angles are computed in float32 on the CPU, as transformers does, then moved and cast.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = _scaled_inv_freq(1.0 / (theta**exponents), rope_scaling)
    positions = torch.arange(max_positions, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype=dtype, device=device)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)``, bit for bit, on the halves,
    written into the halves of one output (no concatenation).

    NOTE: not ``addcmul_``: its fused multiply-add rounds once, so it is not bit for bit.
    """
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    out1, out2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=out1).sub_(x2 * sin)
    torch.mul(x2, cos, out=out2).add_(x1 * sin)
    return out


def rotary_embedding_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin_cache.index_select(0, positions).to(q.dtype)[:, None, :].chunk(2, dim=-1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


@lazy_jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    positions_ptr,
    cache_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cache,
    num_heads,
    num_kv_heads,
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_KVH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0)
    pos = tl.load(positions_ptr + t)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    d_mask = d < half
    cos = tl.load(cache_ptr + pos * stride_cache + d, mask=d_mask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_cache + half + d, mask=d_mask, other=0.0).to(tl.float32)

    h = tl.arange(0, BLOCK_H)[:, None]
    mask = (h < num_heads) & d_mask
    src = q_ptr + t * stride_qt + h * stride_qh + d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    dst = q_out_ptr + (t * num_heads + h) * 2 * half + d
    tl.store(dst, x1 * cos - x2 * sin, mask=mask)
    tl.store(dst + half, x2 * cos + x1 * sin, mask=mask)

    h = tl.arange(0, BLOCK_KVH)[:, None]
    mask = (h < num_kv_heads) & d_mask
    src = k_ptr + t * stride_kt + h * stride_kh + d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    dst = k_out_ptr + (t * num_kv_heads + h) * 2 * half + d
    tl.store(dst, x1 * cos - x2 * sin, mask=mask)
    tl.store(dst + half, x2 * cos + x1 * sin, mask=mask)


def rotary_embedding_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    assert cos_sin_cache.stride(-1) == 1
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens > 0:
        _rotary_kernel[(num_tokens,)](
            q,
            k,
            q_out,
            k_out,
            positions,
            cos_sin_cache,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cos_sin_cache.stride(0),
            num_heads,
            num_kv_heads,
            head_dim // 2,
            BLOCK_H=next_pow2(num_heads),
            BLOCK_KVH=next_pow2(num_kv_heads),
            BLOCK_HALF=next_pow2(head_dim // 2),
        )
    return q_out, k_out


def rotary_embedding_native(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The one-pass C kernel of `csrc/rotary.c` for float32 on CPU, bit for bit the reference;
    None where it does not apply (another dtype, device, shape or layout, or no kernel built)."""
    tokens, heads, head_dim = q.shape
    if (
        any(t.device.type != "cpu" for t in (q, k, positions, cos_sin_cache))
        or any(t.dtype != torch.float32 for t in (q, k, cos_sin_cache))
        or positions.dtype != torch.int64
        or k.dim() != 3
        or k.shape[0] != tokens
        or k.shape[2] != head_dim
        or positions.shape != (tokens,)
        or head_dim % 2
        or q.stride()[1:] != (head_dim, 1)
        or k.stride()[1:] != (head_dim, 1)
        or not cos_sin_cache.is_contiguous()
        or cos_sin_cache.shape[1] != head_dim
        or (kernel := _native_kernel()) is None
    ):
        return None
    positions = positions.contiguous()
    q_out = torch.empty(q.shape, dtype=torch.float32, device="cpu")
    k_out = torch.empty(k.shape, dtype=torch.float32, device="cpu")
    failed = kernel(
        q.data_ptr(),
        q.stride(0),
        k.data_ptr(),
        k.stride(0),
        positions.data_ptr(),
        cos_sin_cache.data_ptr(),
        cos_sin_cache.shape[0],
        q_out.data_ptr(),
        k_out.data_ptr(),
        tokens,
        heads,
        k.shape[1],
        head_dim,
        torch.get_num_threads(),
    )
    if failed:
        low, high = (int(x) for x in torch.aminmax(positions))
        raise IndexError(f"positions {low}..{high} outside the rotary cache")
    return q_out, k_out


@functools.cache
def _native_kernel() -> ctypes._CFuncPtr | None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
    return native.function("rotary", "rotary_embedding_f32", argtypes, ctypes.c_int)


def rotary_embedding(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` ``[T, H, D]`` and ``k`` ``[T, KVH, D]`` at ``positions``, out of place."""
    if use_triton(q):
        return rotary_embedding_triton(q, k, positions, cos_sin_cache)
    out = rotary_embedding_native(q, k, positions, cos_sin_cache)
    return rotary_embedding_ref(q, k, positions, cos_sin_cache) if out is None else out
