"""Finished requests by id, kept so that a later request can resume one (`resume_from`).

Bounded by count and by age, so the router holds no state it cannot lose: the oldest entry
leaves when the table is full, and an entry older than `ttl_s` is gone. Ids are scoped by
`owner` (the digest of the API key that ran the request): another key never finds an entry,
so it can neither read nor continue someone else's tokens.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.api.errors import NotFound
from pdserve.api.sampling import SamplingParams


@dataclass(frozen=True)
class FinishedRequest:
    """A request's tokens: what the worker was given as prompt, what it produced after it
    (a resumed request's output includes the output it resumed), and the sampling settings
    with the seed the router chose."""

    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    params: SamplingParams


class RequestTable:
    def __init__(
        self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, FinishedRequest]] = OrderedDict()

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    def put(self, request_id: str, request: FinishedRequest, owner: str = "") -> None:
        """Records `request`, replacing an earlier request of the same id and owner."""
        key = (owner, request_id)
        self._entries.pop(key, None)
        self._entries[key] = (self._clock(), request)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        self._expire()

    def get(self, request_id: str, owner: str = "") -> FinishedRequest:
        """The request, or NOT_FOUND (never seen by this owner, evicted, or older than the
        TTL)."""
        self._expire()
        entry = self._entries.get((owner, request_id))
        if entry is None:
            raise NotFound(
                f"resume_from: no finished request {request_id!r} is kept (the router keeps "
                f"the last {self.max_entries} for {self.ttl_s:g} s)"
            )
        return entry[1]

    def _expire(self) -> None:
        # NOTE: entries are in insertion order, which is time order, so the oldest is first.
        deadline = self._clock() - self.ttl_s
        while self._entries and next(iter(self._entries.values()))[0] <= deadline:
            self._entries.popitem(last=False)
