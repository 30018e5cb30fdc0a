"""Which decode worker and which prefill worker (if any) take a request.

The router counts what it has in flight on each worker: a request loads its prefill worker
with the prompt tokens it must compute until the prefill call returns, and its decode worker
with its prompt plus `max_tokens` (the KV it will hold) until its last token.

`cache_aware` asks the radix index how many leading blocks of the prompt each worker holds
and picks, for each role, the worker of least

    cost = cache_weight * uncached prompt tokens + in-flight tokens,

preferring workers whose last reported free blocks hold the request. A follow-up turn's
home worker saves every token of the conversation so far, so it keeps the turn unless it
carries `cache_weight` times that many more tokens than another worker; a new conversation
that shares only a system prompt finds it cached on every worker soon, the cache terms differ
little, and load spreads it.

NOTE: the default weight 2 keeps a follow-up on a home worker that has one more request in
flight than the others (its saved tokens are about its prompt minus the system prompt, the
extra load about one prompt plus `max_tokens`); weight 1 (Dynamo's default) moves it.

When the chosen decode worker lacks at most `local_prefill_max_tokens` of the prompt, it
prefills the tail itself: no prefill worker, no transfer.

`least_loaded` (fewest in-flight requests) and `round_robin` ignore the index and always
use a prefill worker; they are the baselines.

Only workers that are up take requests: one that fails leaves its pool until it is back. With
no prefill worker up, every decode worker prefills its requests itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from pdserve.api.errors import InvalidRequest
from pdserve.router.errors import RequestFailed
from pdserve.router.index import RadixIndex

POLICIES = ("cache_aware", "least_loaded", "round_robin")


@dataclass(frozen=True)
class Demand:
    """What placement knows of a request: the block hashes of its tokens (prompt plus any
    output it resumes), their count, `max_tokens`, the workers it is pinned to (""), and the
    decode workers it already failed on (`avoid`)."""

    hashes: Sequence[int]
    num_tokens: int
    max_tokens: int
    prefill_worker: str = ""
    decode_worker: str = ""
    avoid: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Assignment:
    """`prefill` is "" when the decode worker prefills the request itself. The token counts
    are what the request is charged on each worker while it is there."""

    prefill: str
    decode: str
    prefill_tokens: int = 0
    decode_tokens: int = 0


class _Pool:
    """The workers of one role and what the router has in flight on each."""

    def __init__(self, role: str, worker_ids: Iterable[str]) -> None:
        self.role = role
        self.known = frozenset(worker_ids)
        self.requests = dict.fromkeys(sorted(self.known), 0)
        self.tokens = dict.fromkeys(self.requests, 0)
        self._next = 0

    def pinned(self, worker_id: str) -> str:
        if worker_id not in self.known:
            names = ", ".join(sorted(self.known)) or "none"
            raise InvalidRequest(
                f"placement.{self.role}_worker",
                f"no {self.role} worker {worker_id!r} (the cluster has: {names})",
            )
        if worker_id not in self.requests:
            raise RequestFailed("UNAVAILABLE", f"{self.role} worker {worker_id} is not up")
        return worker_id

    def choose(
        self,
        policy: str,
        cost: dict[str, tuple[bool, float]] | None = None,
        avoid: frozenset[str] = frozenset(),
    ) -> str:
        """By `policy`; for cache_aware, by `cost` (worker -> (lacks room, cost))."""
        ids = [w for w in self.requests if w not in avoid]
        if not ids:
            raise RequestFailed("UNAVAILABLE", f"no {self.role} worker is available")
        if policy == "round_robin":
            worker = ids[self._next % len(ids)]
            self._next += 1
            return worker
        if cost is None:
            return min(ids, key=lambda w: (self.requests[w], w))
        return min(ids, key=lambda w: (*cost[w], w))

    def add(self, worker_id: str, tokens: int) -> None:
        self.requests[worker_id] += 1
        self.tokens[worker_id] += tokens

    def release(self, worker_id: str, tokens: int) -> None:
        # NOTE: a worker that failed and came back starts from zero; a request charged to its
        # earlier life may be released after that, and must not drive the counts negative.
        if worker_id in self.requests:
            self.requests[worker_id] = max(0, self.requests[worker_id] - 1)
            self.tokens[worker_id] = max(0, self.tokens[worker_id] - tokens)

    def enable(self, worker_id: str) -> None:
        self.requests.setdefault(worker_id, 0)
        self.tokens.setdefault(worker_id, 0)

    def disable(self, worker_id: str) -> None:
        self.requests.pop(worker_id, None)
        self.tokens.pop(worker_id, None)


class Placer:
    """Places requests with `policy`; see the module's docstring."""

    def __init__(
        self,
        policy: str,
        prefill_ids: Iterable[str],
        decode_ids: Iterable[str],
        *,
        index: RadixIndex | None = None,
        block_size: int = 16,
        cache_weight: float = 2.0,
        local_prefill_max_tokens: int = 256,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown placement policy {policy!r}; choose from {POLICIES}")
        self.policy = policy
        self.prefill = _Pool("prefill", prefill_ids)
        self.decode = _Pool("decode", decode_ids)
        self.index = index if index is not None else RadixIndex()
        self.block_size = block_size
        self.cache_weight = cache_weight
        self.local_prefill_max_tokens = local_prefill_max_tokens

    @property
    def aware(self) -> bool:
        """Whether the policy places by the radix index (and so needs the prompt's hashes)."""
        return self.policy == "cache_aware"

    def place(self, demand: Demand) -> Assignment:
        """Chooses the workers and charges the request to them until it is released."""
        aware = self.aware
        blocks = self.index.match(demand.hashes) if aware else {}

        def uncached(worker: str) -> int:
            return max(0, demand.num_tokens - blocks.get(worker, 0) * self.block_size)

        pinned_prefill = demand.prefill_worker and self.prefill.pinned(demand.prefill_worker)
        if demand.decode_worker:
            decode = self.decode.pinned(demand.decode_worker)
        else:
            costs = self._costs(self.decode, uncached, demand.max_tokens) if aware else None
            decode = self.decode.choose(self.policy, costs, demand.avoid)
        if pinned_prefill:
            prefill = pinned_prefill
        elif not self.prefill.requests or (
            aware and uncached(decode) <= self.local_prefill_max_tokens
        ):
            prefill = ""
        else:
            costs = self._costs(self.prefill, uncached, 0) if aware else None
            prefill = self.prefill.choose(self.policy, costs)
        prefill_tokens = uncached(prefill) if prefill else 0
        if prefill:
            self.prefill.add(prefill, prefill_tokens)
        decode_tokens = demand.num_tokens + demand.max_tokens
        self.decode.add(decode, decode_tokens)
        return Assignment(prefill, decode, prefill_tokens, decode_tokens)

    def _costs(
        self, pool: _Pool, uncached: Callable[[str], int], new_tokens: int
    ) -> dict[str, tuple[bool, float]]:
        """Per worker: (its last reported free blocks cannot hold the request, its cost)."""
        costs = {}
        for worker, in_flight in pool.tokens.items():
            missing = uncached(worker)
            load = self.index.loads.get(worker)
            lacks_room = (
                load is not None and load.free_blocks * self.block_size < missing + new_tokens
            )
            costs[worker] = (lacks_room, self.cache_weight * missing + in_flight)
        return costs

    def prefill_done(self, assignment: Assignment) -> None:
        if assignment.prefill:
            self.prefill.release(assignment.prefill, assignment.prefill_tokens)

    def decode_done(self, assignment: Assignment) -> None:
        self.decode.release(assignment.decode, assignment.decode_tokens)

    def disable(self, role: str, worker_id: str) -> None:
        """Stops placing requests on a worker that failed."""
        self._pool(role).disable(worker_id)

    def enable(self, role: str, worker_id: str) -> None:
        """Places requests on a worker again (it is back)."""
        self._pool(role).enable(worker_id)

    def _pool(self, role: str) -> _Pool:
        return self.prefill if role == "prefill" else self.decode
