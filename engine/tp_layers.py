"""Tensor-parallel layers: each holds one rank's shard of a checkpoint tensor, loads only that
shard, and does the communication its split needs, so the model reads as a plain model.

- `ColumnParallelLinear` splits output rows (fused q/k/v, fused gate/up): no communication,
  its outputs stay split for the next layer.
- `RowParallelLinear` splits input columns (o, down): each rank's partial sums are
  all-reduced.
- `VocabParallelEmbedding` and `ParallelLMHead` split the vocabulary: the embedding
  all-reduces its masked lookups; the LM head gathers the logits on rank 0.

At TP size 1 every shard is the whole tensor and every collective is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.api.errors import ModelLoadError
from pdserve.engine.parallel import TPGroup
from pdserve.engine.weights import LazyTensor
from pdserve.kernels import linear, silu_and_mul_linear


@dataclass(frozen=True)
class Part:
    """One checkpoint tensor's share in a sharded parameter: of its `full` rows (or columns),
    this rank holds `owned`."""

    name: str
    full: int
    owned: range


def _param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=dtype, device=device), requires_grad=False)


def copy_weight(
    dst: torch.Tensor, src: LazyTensor, rows: Part | None = None, cols: Part | None = None
) -> None:
    """Reads `src` (only this rank's rows or columns of it) into `dst`, checking shapes."""
    if rows is not None and src.shape[0] != rows.full:
        raise ModelLoadError(f"tensor '{src.name}' has {src.shape[0]} rows, expected {rows.full}")
    if cols is not None and src.shape[-1] != cols.full:
        raise ModelLoadError(
            f"tensor '{src.name}' has {src.shape[-1]} columns, expected {cols.full}"
        )
    w = src.read(rows.owned if rows else None, cols.owned if cols else None)
    if tuple(w.shape) != tuple(dst.shape):
        raise ModelLoadError(
            f"tensor '{src.name}' has shape {tuple(w.shape)}, expected {tuple(dst.shape)}"
        )
    with torch.no_grad():
        dst.copy_(w)


class ColumnParallelLinear(nn.Module):
    """`parts` stacked along the output: this rank's rows of each, in order."""

    def __init__(
        self, in_features: int, parts: list[Part], bias: bool, dtype: torch.dtype, device
    ) -> None:
        super().__init__()
        self.sizes = [len(p.owned) for p in parts]
        offsets = [sum(self.sizes[:i]) for i in range(len(parts))]
        self._parts = {p.name: (p, off) for p, off in zip(parts, offsets)}
        kw = dict(dtype=dtype, device=device)
        self.weight = _param(sum(self.sizes), in_features, **kw)
        self.bias = _param(sum(self.sizes), **kw) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of a bias-free [gate; up] pair, the two halves of the output."""
        assert self.bias is None and len(self.sizes) == 2 and self.sizes[0] == self.sizes[1]
        return silu_and_mul_linear(x, self.weight)

    def load(self, part: str, src: LazyTensor, bias: bool = False) -> None:
        p, off = self._parts[part]
        target = self.bias if bias else self.weight
        copy_weight(target[off : off + len(p.owned)], src, rows=p)


class RowParallelLinear(nn.Module):
    def __init__(
        self, out_features: int, part: Part, tp: TPGroup, dtype: torch.dtype, device
    ) -> None:
        super().__init__()
        self.part, self.tp = part, tp
        self.weight = _param(out_features, len(part.owned), dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(linear(x, self.weight))

    def load(self, src: LazyTensor) -> None:
        copy_weight(self.weight, src, cols=self.part)


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self, vocab_size: int, hidden_size: int, tp: TPGroup, dtype: torch.dtype, device
    ) -> None:
        super().__init__()
        self.tp = tp
        self.part = Part("vocab", vocab_size, tp.vocab(vocab_size))
        rows = tp.vocab_per_rank(vocab_size)
        self.weight = _param(rows, hidden_size, dtype=dtype, device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        owned = self.part.owned
        local = ids - owned.start
        outside = (ids < owned.start) | (ids >= owned.stop)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))

    def load(self, src: LazyTensor) -> None:
        copy_weight(self.weight[: len(self.part.owned)], src, rows=self.part)


class ParallelLMHead(nn.Module):
    """Each rank computes its vocabulary slice of the logits; rank 0 gets them all. With tied
    embeddings it shares the embedding's shard (the same vocabulary split)."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        tp: TPGroup,
        dtype: torch.dtype,
        device,
        tied: VocabParallelEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size, self.tp = vocab_size, tp
        self.part = Part("vocab", vocab_size, tp.vocab(vocab_size))
        rows = tp.vocab_per_rank(vocab_size)
        kw = dict(dtype=dtype, device=device)
        self.weight = tied.weight if tied is not None else _param(rows, hidden_size, **kw)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """float32 logits `[T, vocab]` on rank 0; None on the other ranks."""
        logits = self.tp.gather_last_dim(linear(hidden, self.weight))
        return None if logits is None else logits[..., : self.vocab_size].float()

    def load(self, src: LazyTensor) -> None:
        copy_weight(self.weight[: len(self.part.owned)], src, rows=self.part)


class Replicated(nn.Module):
    """A tensor every rank holds whole (the RMSNorm weights)."""

    def __init__(self, size: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.weight = _param(size, dtype=dtype, device=device)

    def load(self, src: LazyTensor) -> None:
        copy_weight(self.weight, src)
