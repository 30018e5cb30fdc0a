"""Turns one request's token deltas into `GenerateResponse` messages.

Text is detokenized incrementally (never a broken UTF-8 character) and stop strings are matched
here, in the router, so workers only ever see token ids.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from pdserve.api.messages import TokenDelta, TokenLogprobs
from pdserve.api.output import TextOutput
from pdserve.api.sampling import SamplingParams
from pdserve.api.tokenizer import Tokenizer
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.placement import Assignment


class ResponseBuilder:
    """Holds one request's text state, tokens and counters; `arrival` is a `time.monotonic()`
    value and `assignment` where the router placed the request."""

    def __init__(
        self,
        request_id: str,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        arrival: float,
        assignment: Assignment,
        skip_special_tokens: bool = True,
    ) -> None:
        self.request_id = request_id
        self.finish_reason: str | None = None
        self.token_ids: list[int] = []
        self._assignment = assignment
        self._prefilled_by = assignment.prefill
        self._prompt_token_ids = prompt_token_ids
        self._text = TextOutput(tokenizer, prompt_token_ids, params.stop, skip_special_tokens)
        self._arrival = arrival
        self._first_token_at: float | None = None
        self._sent_first = False
        self._cached_prompt_tokens = 0
        self._worker_timings = pb.Timings()

    def on_delta(self, delta: TokenDelta) -> pb.GenerateResponse:
        """The response for `delta`; sets `finish_reason` when the request is over, either
        because the worker finished it or because a stop string matched."""
        now = time.monotonic()
        if delta.token_ids and self._first_token_at is None:
            self._first_token_at = now
        self.token_ids.extend(delta.token_ids)
        if delta.prefilled_by is not None:
            self._prefilled_by = delta.prefilled_by
        # NOTE: workers may fill usage and timings on any delta; the latest ones win, so a
        # request stopped by a stop string still reports what the workers said so far.
        if delta.usage is not None:
            self._cached_prompt_tokens = delta.usage.cached_prompt_tokens
        if delta.timings is not None:
            t = delta.timings
            self._worker_timings = pb.Timings(
                queue_s=t.queue_s,
                prefill_s=t.prefill_s,
                transfer_s=t.transfer_s,
                transfer_bytes=t.transfer_bytes,
            )
        text, stopped = self._text.add(delta.token_ids, final=delta.finish_reason is not None)
        response = pb.GenerateResponse(
            request_id=self.request_id,
            token_ids=delta.token_ids,
            text=text,
            logprobs=[_logprob(lp) for lp in delta.logprobs],
        )
        if not self._sent_first:
            response.prompt_token_ids.extend(self._prompt_token_ids)
            self._sent_first = True
        if stopped or delta.finish_reason is not None:
            self.finish_reason = "stop" if stopped else delta.finish_reason
            response.finish_reason = self.finish_reason
            response.usage.CopyFrom(self._usage())
            response.timings.CopyFrom(self._timings(now))
            response.placement.prefill_worker = self._prefilled_by
            response.placement.decode_worker = self._assignment.decode
        return response

    def _usage(self) -> pb.Usage:
        return pb.Usage(
            prompt_tokens=len(self._prompt_token_ids),
            cached_prompt_tokens=self._cached_prompt_tokens,
            completion_tokens=len(self.token_ids),
        )

    def _timings(self, now: float) -> pb.Timings:
        timings = pb.Timings()
        timings.CopyFrom(self._worker_timings)
        first = self._first_token_at if self._first_token_at is not None else now
        timings.ttft_s = first - self._arrival
        timings.total_s = now - self._arrival
        return timings


def _logprob(lp: TokenLogprobs) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )
