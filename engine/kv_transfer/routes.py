"""Which KV heads travel from which prefill rank to which decode rank.

Prefill and decode workers choose their tensor-parallel sizes independently, so a decode
rank's KV heads may live on one prefill rank, be spread over several, or (when there are fewer
KV heads than ranks) be replicated on several: each head is taken from the lowest prefill rank
that holds it, so every decode rank receives each of its heads exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.parallel import kv_heads_of


@dataclass(frozen=True)
class Route:
    """`src` of the prefill rank's local KV heads land in `dst` of the decode rank's."""

    prefill_rank: int
    decode_rank: int
    src: slice
    dst: slice


def kv_routes(num_kv_heads: int, prefill_tp: int, decode_tp: int) -> list[Route]:
    holders = [kv_heads_of(num_kv_heads, p, prefill_tp) for p in range(prefill_tp)]

    def source(head: int) -> int:
        return next(p for p, held in enumerate(holders) if head in held)

    routes = []
    for d in range(decode_tp):
        want = kv_heads_of(num_kv_heads, d, decode_tp)
        start = want.start
        for head in [*want[1:], want.stop]:
            p = source(start)
            if head < want.stop and source(head) == p:
                continue
            first = holders[p].start
            routes.append(
                Route(
                    p,
                    d,
                    slice(start - first, head - first),
                    slice(start - want.start, head - want.start),
                )
            )
            start = head
    return routes
