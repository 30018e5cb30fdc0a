"""Kernel tests: Triton launchers against their references, compiled on CUDA or interpreted.

Without CUDA the launchers run under ``TRITON_INTERPRET=1``. Triton reads it when a kernel is
decorated, and ``pdserve.kernels`` decorates at first launch, so setting it here at import
time is early enough even when other test folders imported the package first. Tests call
the ``*_triton`` launchers directly, so the engine's CPU tests in the same process keep the
reference path. bf16 is tested only on CUDA: the interpreter computes it wrongly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

BLOCK_SIZE = 16

TOLERANCES = {
    torch.float32: {"atol": 2e-5, "rtol": 1e-4},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
}
HALF_DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


@dataclass(frozen=True)
class PagedBatch:
    """A ragged batch whose KV sits in shuffled paged blocks; unused slots hold NaN."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    scale: float


def make_paged_batch(
    q_lens: list[int],
    prefix_lens: list[int],
    num_kv_heads: int = 2,
    group: int = 2,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> PagedBatch:
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [q + p for q, p in zip(q_lens, prefix_lens, strict=True)]
    blocks_per_seq = [-(-s // BLOCK_SIZE) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2
    shape = (num_blocks, num_kv_heads, BLOCK_SIZE, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32)
    keys, values = [], []
    for b, seq_len in enumerate(seq_lens):
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        for i in range(blocks_per_seq[b]):
            block = order.pop()
            block_tables[b, i] = block
            rows = slice(i * BLOCK_SIZE, min((i + 1) * BLOCK_SIZE, seq_len))
            k_cache[block, :, : rows.stop - rows.start] = k[rows].transpose(0, 1)
            v_cache[block, :, : rows.stop - rows.start] = v[rows].transpose(0, 1)
        keys.append(k)
        values.append(v)
    q = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    cu_seqlens_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return PagedBatch(
        q=q.to(DEVICE),
        k_cache=k_cache.to(DEVICE),
        v_cache=v_cache.to(DEVICE),
        block_tables=block_tables.to(DEVICE),
        cu_seqlens_q=cu_seqlens_q.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        keys=keys,
        values=values,
        scale=head_dim**-0.5,
    )


def dense_attention_f64(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Textbook causal attention in float64 for the last ``len(q)`` positions of ``k``/``v``."""
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    q_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    positions = torch.arange(seq_len - q_len, seq_len)
    visible = torch.arange(seq_len)[None, :] <= positions[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(params=[torch.float32, *HALF_DTYPES], ids=str)
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture(params=HALF_DTYPES, ids=str)
def half_dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture
def paged_batch():
    return make_paged_batch


@pytest.fixture
def dense_attention():
    return dense_attention_f64


@pytest.fixture
def assert_close():
    def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
        torch.testing.assert_close(
            actual.double().cpu(), expected.double().cpu(), **TOLERANCES[dtype]
        )

    return check
