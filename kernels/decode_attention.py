"""Single-token decode attention over paged KV (flash-decoding on GPU)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from pdserve.kernels._triton import LOG2_E, cdiv, lazy_jit, next_pow2, tl, use_triton

MIN_SPLIT = 256
"""Fewest keys worth a split of their own: shorter splits cost more in the reduction."""


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Batched over all sequences: KV padded to the longest one, padding masked out.

    NOTE: this is the CPU production path. One `index_select` over (block, head) rows copies
    each KV head's blocks of every sequence straight into `[B, KVH, len, D]` order, several
    times faster than advanced indexing and with no transpose copy after it.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    num_blocks = cdiv(int(seq_lens.max()), block_size)
    heads = torch.arange(num_kv_heads, device=q.device)
    rows = block_tables[:, None, :num_blocks].long() * num_kv_heads + heads[None, :, None]
    rows = rows.reshape(-1)
    max_len = num_blocks * block_size
    valid = torch.arange(max_len, device=q.device)[None, :] < seq_lens[:, None]
    pad_seq, pad_pos = (~valid).nonzero(as_tuple=True)

    def gather(cache: torch.Tensor) -> torch.Tensor:
        x = cache.view(-1, block_size, head_dim).index_select(0, rows)
        x = x.view(batch, num_kv_heads, max_len, head_dim).float()
        # Slots past seq_len hold stale or uninitialized data, and a masked score still
        # multiplies its value (0 * NaN = NaN), so those rows are zeroed in the copy.
        x[pad_seq, :, pad_pos] = 0.0
        return x

    # The query heads of one KV head form the "query length" axis of that KV head.
    qg = q.float().view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(
        qg, gather(k_cache), gather(v_cache), attn_mask=valid[:, None, None, :], scale=scale
    )
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


@lazy_jit
def _decode_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    part_out_ptr,
    part_lse_ptr,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_cb,
    stride_ch,
    stride_cs,
    stride_bt,
    num_heads,
    head_dim,
    group,
    num_splits,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KV_BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program: one KV head of one sequence over one KV range (split).

    The ``group`` query heads of the KV head are the rows of one ``tl.dot`` (padded to
    BLOCK_G >= 16), so every KV byte is read once. Writes the split's normalized output
    and its log-sum-exp (base 2) for the reduction kernel. Each sequence divides its own
    length into ``num_splits`` ranges (whole BLOCK_N tiles), so a short sequence in a batch
    planned for a long one (or in a CUDA graph planned for the longest context) still spreads
    over all its programs.
    """
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    if start >= seq_len:
        return
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < group
    d_mask = offs_d < head_dim
    heads = kv_head * group + offs_g
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    kv_head_offset = kv_head * stride_ch
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for n_start in range(start, end, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        page = tl.load(table + offs_n // KV_BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        kv_offset = page * stride_cb + (offs_n % KV_BLOCK_SIZE) * stride_cs + kv_head_offset
        k = tl.load(
            k_cache_ptr + kv_offset[None, :] + offs_d[:, None],
            mask=n_mask[None, :] & d_mask[:, None],
            other=0.0,
        )
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
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

    part = (seq * num_heads + heads).to(tl.int64) * num_splits + split
    tl.store(
        part_out_ptr + part[:, None] * head_dim + offs_d[None, :],
        acc / l_i[:, None],
        mask=g_mask[:, None] & d_mask[None, :],
    )
    tl.store(part_lse_ptr + part, m_i + tl.log2(l_i), mask=g_mask)


@lazy_jit
def _decode_reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    seq_lens_ptr,
    stride_ob,
    stride_oh,
    num_heads,
    head_dim,
    num_splits,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: one query head of one sequence; merges its splits by their LSE."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s * split_len < seq_len
    d_mask = offs_d < head_dim
    part = (seq * num_heads + head).to(tl.int64) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + part, mask=s_mask, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))
    weight = weight / tl.sum(weight, 0)
    o = tl.load(
        part_out_ptr + part[:, None] * head_dim + offs_d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    tl.store(
        out_ptr + seq.to(tl.int64) * stride_ob + head * stride_oh + offs_d,
        tl.sum(weight[:, None] * o, 0),
        mask=d_mask,
    )


def launch_config(on_gpu: bool) -> dict[str, int]:
    """KV tile and warps of the split kernel: GPU-sized, or small for the interpreter."""
    if not on_gpu:
        return {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_N": 64, "num_warps": 4, "num_stages": 3}


@functools.cache
def _program_target(device: torch.device) -> int:
    """How many attention programs fill the device: two waves of SMs (a few on CPU)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _num_splits(q: torch.Tensor, num_kv_heads: int, max_len: int) -> int:
    """Split KV so that few long sequences still fill the device, never below MIN_SPLIT."""
    wanted = cdiv(_program_target(q.device), q.shape[0] * num_kv_heads)
    return max(1, min(wanted, cdiv(max_len, MIN_SPLIT)))


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Flash-decoding: split-KV attention programs, then a reduction over the splits.

    NOTE: the number of splits comes from the block table's width, not from ``seq_lens``,
    so nothing waits on the device; each sequence then splits its own length that many
    ways. ``num_splits`` overrides the plan (tests use it to force several splits).
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    if batch == 0:
        return out
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    q = q if q.stride(-1) == 1 else q.contiguous()
    group = num_heads // num_kv_heads
    config = launch_config(q.is_cuda)
    block_n = config["BLOCK_N"]
    max_len = block_tables.shape[1] * block_size
    num_splits = num_splits or _num_splits(q, num_kv_heads, max_len)
    # Programs past the last split of the longest possible sequence would always exit.
    num_splits = cdiv(max_len, cdiv(cdiv(max_len, num_splits), block_n) * block_n)
    part_out = torch.empty(
        batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device
    )
    part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _decode_attention_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        part_out,
        part_lse,
        scale * LOG2_E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        num_heads,
        head_dim,
        group,
        num_splits,
        BLOCK_G=max(16, next_pow2(group)),
        BLOCK_D=next_pow2(head_dim),
        KV_BLOCK_SIZE=block_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **config,
    )
    _decode_reduce_kernel[(batch, num_heads)](
        part_out,
        part_lse,
        out,
        seq_lens,
        out.stride(0),
        out.stride(1),
        num_heads,
        head_dim,
        num_splits,
        BLOCK_S=next_pow2(num_splits),
        BLOCK_D=next_pow2(head_dim),
        BLOCK_N=block_n,
    )
    return out


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
