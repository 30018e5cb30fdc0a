"""Tensor-parallel context: which shard of each layer this rank holds, and the all-reduce."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: Any = None

    def shard(self, total: int, what: str) -> tuple[int, int]:
        """The [start, end) range of `total` items (heads, channels) this rank owns."""
        if total % self.size:
            raise ValueError(f"{what}={total} is not divisible by tensor-parallel size {self.size}")
        per = total // self.size
        return self.rank * per, (self.rank + 1) * per

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x


SINGLE = TensorParallel()
