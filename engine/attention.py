"""Paged attention over one step's ragged batch: decode tokens first, then prefill chunks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.kernels import decode_attention, prefill_attention, write_kv_cache


@dataclass
class AttentionBatch:
    """Where each token of a step reads and writes KV.

    NOTE: the first `num_decode` tokens belong to `num_decode` sequences that each add one
    token; the remaining tokens are prefill chunks, ragged by `prefill_cu_seqlens_q`. Every
    token's K/V is written to its slot before attention runs, so attention reads the cached
    prefix and the new tokens alike from the paged pool.
    """

    slot_mapping: torch.Tensor
    num_decode: int
    decode_block_tables: torch.Tensor
    decode_seq_lens: torch.Tensor
    prefill_block_tables: torch.Tensor
    prefill_cu_seqlens_q: torch.Tensor
    prefill_seq_lens: torch.Tensor

    @property
    def has_prefill(self) -> bool:
        return self.prefill_seq_lens.numel() > 0


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:
    write_kv_cache(k, v, k_cache, v_cache, batch.slot_mapping)
    nd = batch.num_decode
    if not batch.has_prefill:
        return decode_attention(
            q, k_cache, v_cache, batch.decode_block_tables, batch.decode_seq_lens, scale
        )
    prefill_out = prefill_attention(
        q[nd:],
        k_cache,
        v_cache,
        batch.prefill_block_tables,
        batch.prefill_cu_seqlens_q,
        batch.prefill_seq_lens,
        scale,
    )
    if nd == 0:
        return prefill_out
    decode_out = decode_attention(
        q[:nd], k_cache, v_cache, batch.decode_block_tables, batch.decode_seq_lens, scale
    )
    return torch.cat([decode_out, prefill_out])
