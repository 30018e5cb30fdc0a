"""What crosses a KV channel, as typed messages.

On the wire every message is a fixed-size int64 header, then (for all but `KeepAlive`) a payload
whose size the header states, so the receiver always posts a receive of exactly the right size
(a size mismatch aborts a gloo process; see PLATFORM.md). `KVChunk` payloads are the KV tensor
itself; control messages are msgpack in a uint8 tensor, encoded and decoded only here.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import torch

from pdserve.api.messages import TokenLogprobs


@dataclass(frozen=True)
class KVChunk:
    """One layer's keys and values of the tokens `[token_start, token_start + n)`, as
    `[n, 2, kv_heads, head_dim]`."""

    transfer_id: int
    layer: int
    token_start: int
    payload: torch.Tensor


@dataclass(frozen=True)
class TransferDone:
    """The prefill side finished: every chunk was sent, and this is the token it sampled.

    `cached_prompt_tokens` is what the prefill worker reused from its own prefix cache (the
    request's usage reports it); `first_sent_at` is the wall-clock time of the first chunk
    sent (None when the decode worker held everything already)."""

    transfer_id: int
    first_token: int
    first_logprobs: TokenLogprobs | None
    cached_prompt_tokens: int
    queue_s: float
    prefill_s: float
    first_sent_at: float | None


@dataclass(frozen=True)
class TransferCancel:
    """The sender gave the transfer up; the receiver frees what it reserved."""

    transfer_id: int


@dataclass(frozen=True)
class KeepAlive:
    """Sent while transfers wait in the prefill queue, so the receiver's timeout measures a
    silent peer, not a long queue."""


Message = KVChunk | TransferDone | TransferCancel | KeepAlive

KIND_KV, KIND_DONE, KIND_CANCEL, KIND_KEEPALIVE = 1, 2, 3, 4
HEADER_LEN = 8
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def encode_done(done: TransferDone) -> bytes:
    lp = done.first_logprobs
    logprobs = None if lp is None else [lp.token_id, lp.logprob, [list(t) for t in lp.top]]
    return msgpack.packb(
        [
            done.transfer_id,
            done.first_token,
            logprobs,
            done.cached_prompt_tokens,
            done.queue_s,
            done.prefill_s,
            done.first_sent_at,
        ]
    )


def decode_done(data: bytes) -> TransferDone:
    tid, token, logprobs, cached, queue_s, prefill_s, first_sent_at = msgpack.unpackb(data)
    lp = None
    if logprobs is not None:
        token_id, logprob, top = logprobs
        lp = TokenLogprobs(token_id, logprob, tuple((t, v) for t, v in top))
    return TransferDone(tid, token, lp, cached, queue_s, prefill_s, first_sent_at)
