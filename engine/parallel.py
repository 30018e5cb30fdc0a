"""The tensor-parallel group of one worker: which shard of each layer a rank holds, and the
collectives its layers use.

A worker of TP size N is N processes, one per rank, joined in one torch.distributed group (gloo
for CPU tensors, NCCL for CUDA tensors; the same calls either way) that `join` makes this
process's TP group. Rank 0 schedules; every rank runs its shard of each step.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pdserve.engine.store import bound_group, bound_store

# NOTE: ranks other than 0 wait in a broadcast for rank 0's next step for as long as the
# worker is idle, and a gloo operation that times out breaks the group: the group's own
# timeout is therefore unbounded in practice; only joining it is bounded. A rank that dies does
# not leave the others waiting: the gang dies with it (`gang.py`).
_GROUP_TIMEOUT_S = 365 * 24 * 3600.0

# This process's TP group once `join` made it. NOTE: built directly rather than as torch's
# default group (`init_process_group`), which gives gloo no say in the address its pairs bind.
_group: dist.ProcessGroupGloo | dist.ProcessGroupNCCL | None = None


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1

    @staticmethod
    def host_store(host: str, size: int, timeout_s: float) -> dist.TCPStore:
        """Rank 0's rendezvous store, on the node's cluster address only; its `.port` is what
        the other ranks join."""
        return bound_store(host, size, timeout_s)

    def join(
        self,
        host: str,
        port: int,
        device: torch.device,
        timeout_s: float,
        store: dist.TCPStore | None = None,
    ) -> None:
        """Makes the worker's ranks this process's TP group; blocks (up to `timeout_s`) until
        all joined. Rank 0 passes the store it hosts at `host`, the node's cluster address.

        NOTE: a worker's ranks share a node, so `host` is this rank's address too: its gloo pairs
        listen there, not on the interface gloo would pick."""
        global _group
        if store is None:
            timeout = datetime.timedelta(seconds=timeout_s)
            store = dist.TCPStore(host, port, self.size, False, timeout=timeout)
        _group = bound_group(store, self.rank, self.size, host, device, _GROUP_TIMEOUT_S)

    def shard(self, total: int, what: str) -> range:
        """The items (heads, channels) of `total` that this rank owns: an equal contiguous
        share."""
        if total % self.size:
            raise ValueError(f"{what}={total} is not divisible by tensor-parallel size {self.size}")
        per = total // self.size
        return range(self.rank * per, (self.rank + 1) * per)

    def kv_heads(self, num_kv_heads: int) -> range:
        """The KV heads this rank owns. With fewer KV heads than ranks each head is replicated
        on `size / num_kv_heads` neighbouring ranks: a rank's query heads all read one KV
        head, the one they share under grouped-query attention."""
        return kv_heads_of(num_kv_heads, self.rank, self.size)

    def vocab(self, vocab_size: int) -> range:
        """This rank's rows of the embedding and the LM head; the last rank's share may be
        short (its layer pads it with zero rows)."""
        per = -(-vocab_size // self.size)
        return range(min(self.rank * per, vocab_size), min((self.rank + 1) * per, vocab_size))

    def vocab_per_rank(self, vocab_size: int) -> int:
        return -(-vocab_size // self.size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            _joined().allreduce([x]).wait()
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's `x`, concatenated along the last dimension, on rank 0 (None on the
        others)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        opts = dist.GatherOptions()
        opts.rootRank = 0
        if self.rank != 0:
            _joined().gather([], [x], opts).wait()
            return None
        parts = [torch.empty_like(x) for _ in range(self.size)]
        _joined().gather([parts], [x], opts).wait()
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` on every rank (in place)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        _joined().broadcast([x], opts).wait()
        return x


SINGLE = TPGroup()


def _joined() -> dist.ProcessGroupGloo | dist.ProcessGroupNCCL:
    if _group is None:
        raise RuntimeError("this process has not joined its tensor-parallel group")
    return _group


async def lead(
    tp: TPGroup, ranks: Sequence[Any], host: str, device: torch.device, timeout_s: float
) -> None:
    """Rank 0 hosts the worker's group and has the other ranks (Ray handles with a
    `join(host, port)` method) join it; returns once all have."""
    if not ranks:
        return
    store = TPGroup.host_store(host, tp.size, timeout_s)
    joins = [r.join.remote(host, store.port) for r in ranks]
    await asyncio.to_thread(tp.join, host, store.port, device, timeout_s, store)
    await asyncio.gather(*joins)


def kv_heads_of(num_kv_heads: int, rank: int, size: int) -> range:
    if num_kv_heads >= size:
        return TPGroup(rank, size).shard(num_kv_heads, "num_key_value_heads")
    if size % num_kv_heads:
        raise ValueError(
            f"tensor-parallel size {size} is not a multiple of num_key_value_heads={num_kv_heads}"
        )
    head = rank * num_kv_heads // size
    return range(head, head + 1)
