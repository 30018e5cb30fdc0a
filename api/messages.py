"""Messages between router, prefill workers and decode workers (frozen, torch-free).

The data flows one way: the router sends a `PrefillRequest` to a prefill worker (and gets a
`PrefillResult` back as the answer to that call); the decode worker streams `StepOutputs`, one
batch per engine step for all its requests, which the router consumes from its token link
(`LinkAddress`, `pdserve.api.token_link`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.api.sampling import SamplingParams


@dataclass(frozen=True)
class TokenLogprobs:
    """The sampled token's log-probability and the `top` most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class PrefillRequest:
    """A request placed on a prefill worker, to be decoded on `decode_worker` (or on the decode
    worker alone, which then prefills it itself).

    `attempt_id` is unique per attempt (the router's request id plus a suffix), so a retry
    never meets the deltas or aborts of an earlier attempt. `params.seed` is always set by
    the router, so a retry elsewhere samples the same tokens.
    `output_token_ids` resumes a request that already produced tokens.
    """

    attempt_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    decode_worker: str
    output_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class PrefillResult:
    """The answer to a prefill call: `error_code` is a gRPC status name when it failed."""

    attempt_id: str
    ok: bool
    error_code: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Timings:
    """Seconds a prefill worker spent on a request: waiting for its turn, computing the
    prompt, and waiting for KV sends that the compute did not hide; and the bytes of KV that
    reached the decode worker."""

    queue_s: float = 0.0
    prefill_s: float = 0.0
    transfer_s: float = 0.0
    transfer_bytes: int = 0


@dataclass(frozen=True)
class TokenDelta:
    """New tokens of one request from one decode step; `finish_reason` set on the last one,
    together with `usage` and `timings`. `finish_reason == "error"` carries `error`.
    `prefilled_by` (last delta only) names the prefill worker whose KV the request decoded
    from, or is "" when the decode worker prefilled it itself."""

    attempt_id: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    error: str | None = None
    prefilled_by: str | None = None


@dataclass(frozen=True)
class StepOutputs:
    """Everything one decode worker produced in one step."""

    worker_id: str
    deltas: tuple[TokenDelta, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class RankStatus:
    """One tensor-parallel rank of a worker: the node it runs on, the memory it holds, and the
    KV bytes it received (decode) or sent (prefill) on its own channels."""

    rank: int
    node: str
    weight_bytes: int
    kv_cache_bytes: int
    kv_bytes: int


@dataclass(frozen=True)
class WorkerStatus:
    worker_id: str
    role: str
    tp: int
    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    cached_blocks: int = 0
    requests_total: int = 0
    prompt_tokens_computed: int = 0
    prompt_tokens_cached: int = 0
    kv_blocks_received: int = 0
    kv_blocks_sent: int = 0
    kv_bytes_received: int = 0
    kv_bytes_sent: int = 0
    transfer_fallbacks: int = 0
    ranks: tuple[RankStatus, ...] = ()


@dataclass(frozen=True)
class LinkAddress:
    """Where the router joins a decode worker's token link. `ticket` is fresh for each such
    address (handed out through Ray) and is what the joining side presents first."""

    host: str
    port: int
    ticket: bytes


@dataclass(frozen=True)
class ChannelAddress:
    """Where a prefill rank joins the KV channel that a decode rank hosts for it. `epoch`
    changes whenever the decode side rebuilds the channel."""

    host: str
    port: int
    epoch: int


@dataclass(frozen=True)
class ReserveReply:
    """A decode worker's answer to a reservation: where the KV goes, or why it cannot.

    `cached_tokens` leading tokens are already on the decode worker and are not sent.
    `stale_channel` means the prefill worker must rebuild its channel and ask again.
    `queued_here` means the decode worker's blocks were busy: it queued the request to compute
    it itself once they free, and wants no KV for it.
    """

    transfer_id: int = -1
    cached_tokens: int = 0
    stale_channel: bool = False
    queued_here: bool = False
    error_code: str | None = None
    error: str | None = None
