"""Which prefill worker and which decode worker take a request.

The router counts the requests it has in flight on each worker: a request loads its prefill
worker until the prefill call returns and its decode worker until its last token. The radix
index (cached blocks) and worker-reported load join this cost in a later issue.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pdserve.router.errors import RequestFailed

POLICIES = ("least_loaded", "round_robin")


@dataclass(frozen=True)
class Assignment:
    prefill: str
    decode: str


class _Pool:
    """The workers of one role and the router's in-flight count on each."""

    def __init__(self, role: str, worker_ids: Iterable[str]) -> None:
        self.role = role
        self.load = dict.fromkeys(sorted(worker_ids), 0)
        self._next = 0

    def choose(self, policy: str) -> str:
        if not self.load:
            raise RequestFailed("UNAVAILABLE", f"no {self.role} worker is available")
        if policy == "round_robin":
            ids = list(self.load)
            worker = ids[self._next % len(ids)]
            self._next += 1
            return worker
        return min(self.load, key=lambda w: (self.load[w], w))

    def release(self, worker_id: str) -> None:
        if worker_id in self.load:
            self.load[worker_id] -= 1


class Placer:
    """Places requests with `policy` ("least_loaded": fewest in-flight requests, ties by id;
    "round_robin": workers in id order, in turn)."""

    def __init__(self, policy: str, prefill_ids: Iterable[str], decode_ids: Iterable[str]) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown placement policy {policy!r}; choose from {POLICIES}")
        self.policy = policy
        self.prefill = _Pool("prefill", prefill_ids)
        self.decode = _Pool("decode", decode_ids)

    def place(self) -> Assignment:
        """Chooses both workers and counts the request on them until it is released."""
        decode = self.decode.choose(self.policy)
        prefill = self.prefill.choose(self.policy)
        self.prefill.load[prefill] += 1
        self.decode.load[decode] += 1
        return Assignment(prefill, decode)

    def prefill_done(self, assignment: Assignment) -> None:
        self.prefill.release(assignment.prefill)

    def decode_done(self, assignment: Assignment) -> None:
        self.decode.release(assignment.decode)

    def remove_decode(self, worker_id: str) -> None:
        """Stops placing requests on a decode worker whose token stream ended."""
        self.decode.load.pop(worker_id, None)
