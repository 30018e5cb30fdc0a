"""Paged attention over one step's ragged batch: decode tokens first, then prefill chunks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.dense_kv import DenseView
from pdserve.kernels import (
    decode_attention,
    dense_decode_attention,
    fresh_prefill_attention,
    prefill_attention,
    write_kv_cache,
)


@dataclass
class AttentionBatch:
    """Where each token of a step reads and writes KV.

    NOTE: the first `num_decode` tokens belong to `num_decode` sequences that each add one
    token; the remaining tokens are prefill chunks, ragged by `prefill_cu_seqlens_q`. Every
    token's K/V is written to its slot before attention runs, so attention reads the cached
    prefix and the new tokens alike from the paged pool. With `dense` (CPU), decode tokens
    also go to the dense mirror, and decode attention reads the mirror instead of the pool.
    `fresh_prefill_lens` (CPU) lists the prefill chunks' lengths when none has a cached
    prefix: every key is then among this step's own tokens, and prefill attention reads
    them from `k` and `v` instead of the pool.
    """

    slot_mapping: torch.Tensor
    num_decode: int
    decode_block_tables: torch.Tensor
    decode_seq_lens: torch.Tensor
    prefill_block_tables: torch.Tensor
    prefill_cu_seqlens_q: torch.Tensor
    prefill_seq_lens: torch.Tensor
    dense: DenseView | None = None
    fresh_prefill_lens: tuple[int, ...] | None = None

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
        return _decode(q, k, v, k_cache, v_cache, batch, scale)
    if batch.fresh_prefill_lens is not None:
        prefill_out = fresh_prefill_attention(
            q[nd:], k[nd:], v[nd:], batch.fresh_prefill_lens, scale
        )
    else:
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
    decode_out = _decode(q[:nd], k[:nd], v[:nd], k_cache, v_cache, batch, scale)
    return torch.cat([decode_out, prefill_out])


def _decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:
    if batch.dense is None:
        return decode_attention(
            q, k_cache, v_cache, batch.decode_block_tables, batch.decode_seq_lens, scale
        )
    return _dense_decode(q, k, v, k_cache, batch.dense, scale)


def _dense_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    view: DenseView,
    scale: float,
) -> torch.Tensor:
    """Appends the decode tokens' K/V to their mirror rows and attends over the rows in place."""
    keys, values = view.mirror.layer(k_cache)
    return dense_decode_attention(q, k, v, keys, values, view.rows, view.lens, scale)
