"""The decode worker: receives KV from prefill workers, decodes continuously, streams tokens.

The engine, and all request state, live on an `EngineThread`: RPCs hand it their work, which
runs between steps, so the actor's event loop stays free to take the next call at once and
nothing needs a lock. KV arrives through `KVReceiver` into blocks the engine reserved (and
counts as used). This worker
alone decides when a request falls back to local prefill: when its transfer fails, goes silent
or arrives incomplete, when another part reports that it could not deliver the KV, or when its
blocks are too busy to reserve (the request then waits here for them instead of failing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pdserve.api.errors import CapacityExceeded, PdserveError
from pdserve.api.messages import (
    ChannelAddress,
    PrefillRequest,
    ReserveReply,
    StepOutputs,
    Timings,
    TokenDelta,
    Usage,
    WorkerStatus,
)
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine_thread import EngineThread
from pdserve.engine.event_publisher import EventPublisher
from pdserve.engine.kv_transfer.messages import TransferDone
from pdserve.engine.kv_transfer.receiver import Incoming, KVReceiver
from pdserve.engine.llm_engine import LLMEngine, StepOutput

logger = logging.getLogger(__name__)


@dataclass
class _RequestInfo:
    """What the stream reports for a request: `prefilled_by` is the prefill worker whose KV it
    decodes from ("" once this worker prefills it), `cached_prompt_tokens` what that worker
    reused (None: take this engine's own count)."""

    prompt_tokens: int
    prefilled_by: str = ""
    cached_prompt_tokens: int | None = None
    completion_tokens: int = 0
    timings: Timings = field(default_factory=Timings)


class DecodeService:
    def __init__(
        self, worker_id: str, config: EngineConfig, host: str, transfer_timeout_s: float
    ) -> None:
        self.worker_id = worker_id
        self.engine = LLMEngine(config)
        self._core = EngineThread(f"engine-{worker_id}", self._step)
        self._receiver = KVReceiver(
            host,
            self.engine.kv_cache,
            config.block_size,
            transfer_timeout_s,
            post=self._core.post,
            on_done=self._admit,
            on_cancel=self._release,
            on_failed=self._fall_back,
        )
        self._events = EventPublisher(worker_id, self.engine)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stream: asyncio.Queue[StepOutputs] = asyncio.Queue()
        self._outbox: list[TokenDelta] = []
        self._requests: dict[str, _RequestInfo] = {}
        self.num_fallbacks = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._events.attach(self._loop)
        self._core.start()

    # --- the RPC surface (on the event loop; the work runs on the engine thread) ------------

    async def open_channel(self, prefill_id: str) -> ChannelAddress:
        return await self._core.call(self._receiver.open_channel, prefill_id)

    async def reserve(self, req: PrefillRequest, prefill_id: str, epoch: int) -> ReserveReply:
        """Holds blocks for a request's KV; the reply says how many leading tokens this worker
        holds already (only the rest is sent)."""
        return await self._core.call(self._reserve, req, prefill_id, epoch)

    async def prefill_locally(self, req: PrefillRequest) -> bool:
        """Prefills a request here: the router's choice for a short uncached tail, or a report
        that its KV cannot come (a dead prefill worker, no channel). A request with a
        reservation falls back; one already being computed or decoded is left as it is."""
        return await self._core.call(self._prefill_locally, req, time.monotonic())

    async def abort(self, attempt_id: str) -> bool:
        return await self._core.call(self._abort, attempt_id)

    async def kv_snapshot(self) -> bytes:
        return await self._core.call(self._events.snapshot)

    def kv_events(self) -> AsyncIterator[bytes]:
        return self._events.stream()

    async def status(self) -> WorkerStatus:
        return await self._core.call(self._status)

    async def stream(self) -> AsyncIterator[StepOutputs]:
        """Yields the outputs of every step; when the consumer lags, the steps that piled up
        go out as one message, so a slow link costs throughput of messages, not latency."""
        while True:
            batch = [await self._stream.get()]
            while not self._stream.empty():
                batch.append(self._stream.get_nowait())
            if len(batch) == 1:
                yield batch[0]
            else:
                yield StepOutputs(self.worker_id, tuple(d for b in batch for d in b.deltas))

    # --- requests (on the engine thread) ----------------------------------------------------

    def _reserve(self, req: PrefillRequest, prefill_id: str, epoch: int) -> ReserveReply:
        if not self._receiver.channel_ok(prefill_id, epoch):
            return ReserveReply(stale_channel=True)
        aid = req.attempt_id
        try:
            cached = self.engine.reserve(
                aid, req.prompt_token_ids, req.params, req.output_token_ids
            )
        except CapacityExceeded:
            # NOTE: busy blocks are no reason to refuse: the request waits in this engine's
            # queue and is computed here once blocks free (the scheduler preempts if it must).
            self._prefill_locally(req, time.monotonic())
            return ReserveReply(queued_here=True)
        except PdserveError as e:
            return ReserveReply(error_code=e.grpc_code, error=str(e))
        num_tokens = len(req.prompt_token_ids) + len(req.output_token_ids)
        inc = self._receiver.expect(
            aid, prefill_id, self.engine.block_ids(aid), num_tokens, held=cached
        )
        self._requests[aid] = _RequestInfo(len(req.prompt_token_ids), prefilled_by=prefill_id)
        return ReserveReply(transfer_id=inc.transfer_id, cached_tokens=cached)

    def _prefill_locally(self, req: PrefillRequest, arrived: float) -> bool:
        aid = req.attempt_id
        inc = self._receiver.get(aid)
        if inc is not None:
            self._fall_back(inc, "the prefill side reported a failure")
            return True
        if self.engine.has_request(aid):
            return True
        self.engine.add_request(
            aid, req.prompt_token_ids, req.params, req.output_token_ids, arrived
        )
        self._requests[aid] = _RequestInfo(len(req.prompt_token_ids))
        return True

    def _abort(self, attempt_id: str) -> bool:
        inc = self._receiver.get(attempt_id)
        if inc is not None:
            self._receiver.close(inc)
        self._requests.pop(attempt_id, None)
        return self.engine.abort(attempt_id)

    # --- transfers ending (posted by the receiver) ------------------------------------------

    def _admit(self, inc: Incoming, msg: TransferDone) -> None:
        """The transfer is complete: the request queues for the running batch with its first
        token."""
        if not self._receiver.close(inc):
            return
        if not inc.complete:
            self._fall_back_closed(inc, f"incomplete transfer (layers reached {inc.layer_end})")
            return
        info = self._requests[inc.attempt_id]
        info.cached_prompt_tokens = msg.cached_prompt_tokens
        info.timings = Timings(
            msg.queue_s,
            msg.prefill_s,
            self._receiver.transfer_seconds(inc, msg),
            inc.bytes_landed,
        )
        out = self.engine.admit_prefilled(inc.attempt_id, msg.first_token, msg.first_logprobs)
        self._emit([out])

    def _release(self, inc: Incoming) -> None:
        if self._receiver.close(inc):
            self._requests.pop(inc.attempt_id, None)
            self.engine.abort(inc.attempt_id)

    def _fall_back(self, inc: Incoming, reason: str) -> None:
        if self._receiver.close(inc):
            self._fall_back_closed(inc, reason)

    def _fall_back_closed(self, inc: Incoming, reason: str) -> None:
        self.num_fallbacks += 1
        logger.warning(
            "attempt %s: KV transfer failed (%s); prefilling here", inc.attempt_id, reason
        )
        self._requests[inc.attempt_id].prefilled_by = ""
        self.engine.fall_back(inc.attempt_id)

    def _fail(self, attempt_ids: list[str], error: str) -> None:
        for aid in attempt_ids:
            self._requests.pop(aid, None)
            self._outbox.append(TokenDelta(aid, (), finish_reason="error", error=error))

    # --- the step and the token stream (on the engine thread) -------------------------------

    def _emit(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            info = self._requests.get(out.request_id)
            usage = timings = prefilled_by = None
            if info is not None:
                first = info.completion_tokens == 0
                info.completion_tokens += len(out.new_token_ids)
                # NOTE: usage and timings ride on the first delta too, so a request that the
                # router ends early (a stop string) still reports them.
                if first and not info.prefilled_by:  # computed here: the engine timed it
                    info.timings = Timings(out.queue_s, out.prefill_s, 0.0)
                if first or out.finished:
                    cached = info.cached_prompt_tokens
                    cached = out.cached_prompt_tokens if cached is None else cached
                    usage = Usage(info.prompt_tokens, cached, info.completion_tokens)
                    timings = info.timings
                    prefilled_by = info.prefilled_by
                if out.finished:
                    del self._requests[out.request_id]
            self._outbox.append(
                TokenDelta(
                    out.request_id,
                    out.new_token_ids,
                    (out.logprobs,) if out.logprobs is not None else (),
                    out.finish_reason if out.finished else None,
                    usage,
                    timings,
                    prefilled_by=prefilled_by,
                )
            )

    def _flush(self, idle: bool = False) -> None:
        """Hands the deltas and KV events so far to their streams, right after a step (or as
        the worker goes `idle`)."""
        if self._outbox:
            outputs = StepOutputs(self.worker_id, tuple(self._outbox))
            self._outbox = []
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._stream.put_nowait, outputs)
        self._events.publish(idle)

    def _step(self) -> bool:
        """One engine step if there is work. False when idle, or when waiting requests need
        blocks that transfers in flight hold: the thread then sleeps until an admission,
        release, fallback or RPC hands it work."""
        if not self.engine.has_unfinished():
            self._flush(idle=True)
            return False
        if self._outbox:
            self._flush()  # what came in since the last step (a landed transfer's first token)
        try:
            outputs = self.engine.step()
        except Exception as e:  # the loop must outlive a bad step, or every request hangs
            logger.exception("decode step failed; ending the requests in it")
            self._receiver.close_all()  # no late KV may land in the blocks freed next
            self._fail(self.engine.abort_all(), f"decode step failed: {e}")
            self._flush()
            return True
        self._emit(outputs)
        self._flush()
        return bool(outputs) or self.engine.stats().running > 0

    def _status(self) -> WorkerStatus:
        return self.engine.stats().worker_status(
            self.worker_id,
            "decode",
            kv_blocks_received=self._receiver.blocks_received,
            kv_bytes_received=self._receiver.bytes_received,
            transfer_fallbacks=self.num_fallbacks,
        )
