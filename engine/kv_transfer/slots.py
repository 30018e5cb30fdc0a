"""Copying a token range of one layer's KV between the paged cache and a contiguous buffer."""

from __future__ import annotations

import torch


def token_slots(
    block_ids: list[int], block_size: int, start: int, end: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, offset in block) of each token position in `[start, end)`."""
    pos = torch.arange(start, end)
    blocks = torch.tensor(block_ids, dtype=torch.long)[pos // block_size]
    return blocks.to(device), (pos % block_size).to(device)


def gather_tokens(
    kv_cache: torch.Tensor, layer: int, slots: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """One layer's K and V of the given token slots, as one contiguous `[n, 2, heads, D]`
    staging buffer."""
    blocks, offsets = slots
    return kv_cache[layer][:, blocks, :, offsets].contiguous()


def scatter_tokens(
    kv_cache: torch.Tensor,
    layer: int,
    slots: tuple[torch.Tensor, torch.Tensor],
    payload: torch.Tensor,
    heads: slice = slice(None),
) -> None:
    """Writes `payload` (`[n, 2, h, D]`) into the local KV heads `heads` of the slots."""
    blocks, offsets = slots
    kv_cache[layer][:, blocks, heads, offsets] = payload
