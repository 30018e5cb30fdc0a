"""Causal prefill attention over a ragged batch whose KV lives in paged blocks.

The new tokens of sequence ``b`` are its last ``q_len_b`` positions; their K/V are already in
the cache, so a cached prefix (prefix-cache hit, or earlier chunks of a chunked prefill) is
read through the block table and never recomputed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.kernels._triton import LOG2_E, cdiv, lazy_jit, next_pow2, tl, use_triton


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One sequence's ``[KVH, seq_len, D]`` keys or values, gathered from its blocks."""
    _, num_kv_heads, block_size, head_dim = cache.shape
    blocks = block_table[: cdiv(seq_len, block_size)]
    # NOTE: one index_select over (block, head) rows of the contiguous cache gathers straight
    # into head-major order; selecting through a transposed view would copy the whole cache.
    heads = torch.arange(num_kv_heads, device=cache.device)
    rows = (heads[:, None] + blocks[None, :].long() * num_kv_heads).reshape(-1)
    kv = cache.view(-1, block_size, head_dim).index_select(0, rows)
    return kv.view(num_kv_heads, -1, head_dim)[:, :seq_len]


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


# (BLOCK_M, BLOCK_N, num_warps, num_stages) to autotune over on a GPU, by padded head dim.
# NOTE: each list starts with the fixed config of 2026-11-29 (0.72-0.86x SDPA flash on an H200
# at head dim 128), so tuning never picks worse; none spills registers at sm_90
# (tests/kernels/compile_for_h100.py: at head dim 128, 128x64 with 4 warps spills 456 bytes,
# 64x128 with 4 warps 160).
GPU_TILES = {
    64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4), (64, 128, 4, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4)],
}


def gpu_tiles(head_dim: int) -> list[tuple[int, int, int, int]]:
    return GPU_TILES[64 if next_pow2(head_dim) <= 64 else 128]


def _gpu_configs() -> list:
    from pdserve.kernels._triton import triton

    tiles = sorted({t for ts in GPU_TILES.values() for t in ts})
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
        for m, n, w, st in tiles
    ]


def _tiles_for_head_dim(configs: list, named_args: dict, **kwargs) -> list:
    wanted = set(gpu_tiles(named_args["head_dim"]))
    return [
        c
        for c in configs
        if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted
    ]


@lazy_jit(autotune=_gpu_configs, prune=_tiles_for_head_dim, key=("head_dim",))
def _prefill_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    cu_seqlens_ptr,
    seq_lens_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_ch,
    stride_cs,
    stride_bt,
    max_q_len,
    head_dim,
    group,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KV_BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program: BLOCK_M new tokens of one sequence, one query head.

    Query heads of one KV head are adjacent in the grid, so their KV reads share L2.
    """
    head = tl.program_id(0)
    # NOTE: the last query tiles see the most keys; launching them first balances the tail.
    m_block = tl.cdiv(max_q_len, BLOCK_M) - 1 - tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    m_start = m_block * BLOCK_M
    if m_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < head_dim
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    positions = prefix + offs_m
    kv_head_offset = (head // group) * stride_ch
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kv_end = tl.minimum(seq_len, prefix + m_start + BLOCK_M)
    for n_start in range(0, kv_end, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < seq_len
        page = tl.load(table + offs_n // KV_BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        kv_offset = page * stride_cb + (offs_n % KV_BLOCK_SIZE) * stride_cs + kv_head_offset
        k = tl.load(
            k_cache_ptr + kv_offset[None, :] + offs_d[:, None],
            mask=n_mask[None, :] & d_mask[:, None],
            other=0.0,
        )
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        # Tiles wholly below the first query of this block need no causal mask; the
        # mask also hides keys past seq_len, which only diagonal tiles reach.
        if n_start + BLOCK_N > prefix + m_start + 1:
            qk = tl.where(offs_n[None, :] <= positions[:, None], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_cache_ptr + kv_offset[:, None] + offs_d[None, :],
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        acc,
        mask=m_mask[:, None] & d_mask[None, :],
    )


def launch_config() -> dict[str, int]:
    """Tiles and warps for the interpreter, whose cost grows with programs x loop steps (on a
    GPU the kernel is autotuned over `_gpu_configs`)."""
    return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


def prefill_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    batch = seq_lens.shape[0]
    out = torch.empty_like(q)
    if num_tokens == 0 or batch == 0:
        return out
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    q = q if q.stride(-1) == 1 else q.contiguous()
    max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    config = {} if _prefill_attention_kernel.autotunes() else launch_config()

    def grid(meta: dict) -> tuple[int, int, int]:
        return (num_heads, cdiv(max_q_len, meta["BLOCK_M"]), batch)

    _prefill_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        cu_seqlens_q,
        seq_lens,
        scale * LOG2_E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        max_q_len,
        head_dim,
        num_heads // k_cache.shape[1],
        BLOCK_D=next_pow2(head_dim),
        KV_BLOCK_SIZE=k_cache.shape[2],
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **config,
    )
    return out


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
