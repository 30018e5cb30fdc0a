"""Causal attention of prompts with no cached prefix, over their own keys and values (the CPU
engine's prefill): the native kernel of `csrc/causal_prefill_attention.c`, or torch's SDPA.

Every key a prompt's tokens attend to is among the prompt's own tokens, so this reads `k` and
`v` as the QKV projection made them instead of the paged cache.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from pdserve.kernels import native

# NOTE: besides a packed copy of the keys and values, the kernel keeps a block's scores for every
# key before it (up to 2 x BLOCK_ROWS x group x prompt length floats a thread); past this
# length SDPA, which streams keys, takes over.
_NATIVE_MAX_LEN = 8192


def fresh_prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: tuple[int, ...], scale: float
) -> torch.Tensor:
    """``q`` ``[T, H, D]``, ``k`` and ``v`` ``[T, KVH, D]`` hold prompts of ``lengths`` tokens
    one after another (``sum(lengths) == T``); returns each token's causal attention over its
    own prompt, ``[T, H, D]`` in ``q``'s dtype."""
    _check_lengths(q, k, v, lengths)
    if not lengths:
        return torch.empty_like(q)
    out = fresh_prefill_attention_native(q, k, v, lengths, scale)
    return fresh_prefill_attention_ref(q, k, v, lengths, scale) if out is None else out


def _check_lengths(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: tuple[int, ...]
) -> None:
    if (
        q.dim() != 3
        or k.dim() != 3
        or sum(lengths) != q.shape[0]
        or k.shape[0] != q.shape[0]
        or v.shape != k.shape
    ):
        raise ValueError(
            f"prompts of {sum(lengths)} tokens do not fit q {tuple(q.shape)}, k "
            f"{tuple(k.shape)} and v {tuple(v.shape)}"
        )


def fresh_prefill_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: tuple[int, ...], scale: float
) -> torch.Tensor:
    """Torch's SDPA: one call when the prompts are of one length, else one per prompt."""
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = k.shape[1]

    def heads_first(x: torch.Tensor, n: int, length: int, h: int) -> torch.Tensor:
        return x.float().view(n, length, h, head_dim).transpose(1, 2)

    def attend(start: int, n: int, length: int) -> torch.Tensor:
        end = start + n * length
        out = F.scaled_dot_product_attention(
            heads_first(q[start:end], n, length, num_heads),
            heads_first(k[start:end], n, length, num_kv_heads),
            heads_first(v[start:end], n, length, num_kv_heads),
            is_causal=True,
            scale=scale,
            enable_gqa=True,
        )
        return out.transpose(1, 2).reshape(n * length, num_heads, head_dim).to(q.dtype)

    if len(set(lengths)) == 1:
        return attend(0, len(lengths), lengths[0])
    starts = [0]
    for length in lengths[:-1]:
        starts.append(starts[-1] + length)
    return torch.cat([attend(start, 1, length) for start, length in zip(starts, lengths)])


def fresh_prefill_attention_native(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: tuple[int, ...], scale: float
) -> torch.Tensor | None:
    """The C kernel for float32 on CPU; None where it does not apply (another dtype or device,
    a head size that is not a multiple of 16, rows whose heads are not contiguous, a prompt
    longer than `_NATIVE_MAX_LEN`, or no kernel built)."""
    _check_lengths(q, k, v, lengths)
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if (
        not lengths
        or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in (q, k, v))
        or head_dim % 16
        or kv_heads < 1
        or heads % kv_heads
        or k.shape[2] != head_dim
        or any(t.stride()[1:] != (head_dim, 1) for t in (q, k, v))
        or min(lengths) < 1
        or max(lengths) > _NATIVE_MAX_LEN
        or (kernel := _native_kernel()) is None
    ):
        return None
    lens = torch.tensor(lengths, dtype=torch.int64)
    starts = torch.cumsum(lens, 0) - lens
    out = torch.empty(tokens, heads, head_dim, dtype=torch.float32)
    failed = kernel(
        q.data_ptr(),
        q.stride(0),
        k.data_ptr(),
        k.stride(0),
        v.data_ptr(),
        v.stride(0),
        starts.data_ptr(),
        lens.data_ptr(),
        len(lengths),
        out.data_ptr(),
        heads,
        kv_heads,
        head_dim,
        scale,
        torch.get_num_threads(),
    )
    if failed:
        raise MemoryError("fresh prefill attention could not allocate its buffers")
    return out


@functools.cache
def _native_kernel() -> ctypes._CFuncPtr | None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, ptr, i64, ptr, i64, i64, i64]
    argtypes += [ctypes.c_float, ctypes.c_int]
    return native.function(
        "causal_prefill_attention", "causal_prefill_attention_f32", argtypes, ctypes.c_int
    )
