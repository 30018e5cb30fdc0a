"""Single-token decode attention over paged KV (flash-decoding on GPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pdserve.kernels._triton import use_triton


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Batched over all sequences: KV padded to the longest one, padding masked out."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    num_blocks = -(-int(seq_lens.max()) // block_size)
    tables = block_tables[:, :num_blocks]
    k = k_cache[tables].transpose(1, 2).reshape(batch, num_kv_heads, -1, head_dim).float()
    v = v_cache[tables].transpose(1, 2).reshape(batch, num_kv_heads, -1, head_dim).float()
    positions = torch.arange(k.shape[2], device=q.device)
    mask = (positions[None, :] < seq_lens[:, None].to(positions.dtype))[:, None, None, :]
    # The query heads of one KV head form the "query length" axis of that KV head.
    qg = q.float().view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    raise NotImplementedError("Triton decode attention lands in the next commit")


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one query per sequence, ``q`` ``[B, H, D]`` at position ``seq_len - 1``."""
    fn = decode_attention_triton if use_triton(q) else decode_attention_ref
    return fn(q, k_cache, v_cache, block_tables, seq_lens, scale)
