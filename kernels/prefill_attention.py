"""Causal prefill attention over a ragged batch whose KV lives in paged blocks.

The new tokens of sequence ``b`` are its last ``q_len_b`` positions; their K/V are already in
the cache, so a cached prefix (prefix-cache hit, or earlier chunks of a chunked prefill) is
read through the block table and never recomputed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pdserve.kernels._triton import use_triton


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One sequence's ``[KVH, seq_len, D]`` keys or values, gathered from its blocks."""
    num_blocks, num_kv_heads, block_size, head_dim = cache.shape
    blocks = block_table[: -(-seq_len // block_size)]
    kv = cache[blocks].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)
    return kv[:, :seq_len]


def prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    out = torch.empty_like(q)
    starts = cu_seqlens_q.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        start, end = starts[b], starts[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        qb = q[start:end].transpose(0, 1).float()
        kb = gather_kv(k_cache, block_tables[b], seq_len).float()
        vb = gather_kv(v_cache, block_tables[b], seq_len).float()
        # Queries sit at the end: query i may see keys 0 .. seq_len - q_len + i.
        mask = None
        if q_len != seq_len:
            mask = torch.ones(q_len, seq_len, dtype=torch.bool, device=q.device).tril(
                seq_len - q_len
            )
        ob = F.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
        )
        out[start:end] = ob.transpose(0, 1).to(q.dtype)
    return out


def prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    raise NotImplementedError("Triton prefill attention lands in the next commit")


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of ``q`` ``[T, H, D]`` (ragged by ``cu_seqlens_q``) over paged KV.

    ``seq_lens[b]`` is the cached prefix plus the new tokens of sequence ``b``. Query head
    ``h`` reads KV head ``h // (H // KVH)``.
    """
    fn = prefill_attention_triton if use_triton(q) else prefill_attention_ref
    return fn(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale)
