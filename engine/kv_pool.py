"""The paged KV memory: a reference-counted block pool and the cache tensor it indexes.

The pool hands out block ids and counts references; it knows nothing of prefixes or requests.
"""

from __future__ import annotations

import os
from collections import deque

import torch

from pdserve.api.errors import CapacityExceeded


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise CapacityExceeded(f"KV pool has {len(self._free)} free blocks, {n} requested")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def incref(self, blocks: list[int]) -> None:
        for b in blocks:
            if self._refs[b] == 0:
                raise ValueError(f"block {b} is free; only held blocks can be shared")
            self._refs[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drops one reference to each block; a block with none left returns to the pool."""
        for b in blocks:
            if self._refs[b] <= 0:
                raise ValueError(f"block {b} freed more often than allocated")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def ref_count(self, block: int) -> int:
        return self._refs[block]


def allocate_kv_cache(
    num_layers: int,
    num_blocks: int,
    num_kv_heads: int,
    block_size: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> torch.Tensor:
    """One tensor `[layers, 2 (k, v), blocks, kv_heads, block_size, head_dim]`.

    NOTE: heads come before tokens inside a block so that one rank's heads of a run of blocks
    (what a tensor-parallel peer owns) is a strided slice that gathers into one contiguous
    staging buffer, and a (block, head) tile is contiguous for the attention kernels.
    """
    return torch.zeros(
        num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim, dtype=dtype, device=device
    )


def blocks_for_memory(
    memory_bytes: float,
    num_layers: int,
    num_kv_heads: int,
    block_size: int,
    head_dim: int,
    dtype: torch.dtype,
) -> int:
    per_block = num_layers * 2 * num_kv_heads * block_size * head_dim * dtype.itemsize
    return max(1, int(memory_bytes // per_block))


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of the device: the GPU's on CUDA, the machine's RAM on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
