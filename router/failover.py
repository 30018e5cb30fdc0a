"""When a request's path to its workers breaks: which breaks move it, and how it continues.

A request whose decode worker died (`Lost`), or whose path to one broke (a retryable
`Failure`), continues on another decode worker from the tokens the client already has: the
continuation carries them as output to resume from, with the same prompt, seed and total
`max_tokens`. The sampler draws each token from (seed, absolute position) alone, so the
continuation produces exactly the tokens the undisturbed request would have, and the client's
stream goes on as one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pdserve.api.messages import PrefillRequest
from pdserve.router.streams import Event, Failure, Lost

# A request moves at most this many times; each attempt avoids the decode workers that
# failed it before.
MAX_ATTEMPTS = 4
# How long a request whose decode worker died waits for one to be up (a cluster of one decode
# worker waits for its restart).
WAIT_FOR_DECODE_S = 60.0


def broken_worker(event: Event, decode_worker: str) -> str | None:
    """The decode worker to move away from if `event` means the request's path broke."""
    if isinstance(event, Lost):
        return event.worker_id
    if isinstance(event, Failure) and event.retryable:
        return decode_worker
    return None


def continuation(request: PrefillRequest, produced: Sequence[int]) -> PrefillRequest:
    """The request that continues `request` after it produced `produced` (tokens the client
    has). NOTE: the engine counts resumed output towards `max_tokens`, so the params stay."""
    return dataclasses.replace(request, output_token_ids=request.output_token_ids + tuple(produced))
