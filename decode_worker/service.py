"""The decode worker: receives KV from prefill workers, decodes continuously, streams tokens.

Tokens leave on the token link (`token_link.py`), straight from the engine thread to the
router, which also sends the requests this worker prefills itself on it.

The engine, and all request state, live on an `EngineThread`: RPCs hand it their work, which
runs between steps, so the actor's event loop stays free to take the next call at once and
nothing needs a lock. KV arrives through `KVReceiver` into blocks the engine reserved (and
counts as used). This worker
alone decides when a request falls back to local prefill: when its transfer fails, goes silent
or arrives incomplete, when another part reports that it could not deliver the KV, or when its
blocks are too busy to reserve (the request then waits here for them instead of failing).

A worker of TP size N is this service on rank 0 and N-1 `DecodeRankService`s (`ranks`, their
Ray handles), which run every step with it and receive their own KV heads on channels of their
own. A rank receives from each prefill rank that holds some of its heads (`kv_routes`); each
such (decode rank, prefill rank) pair is a *part* of a transfer, and a request is admitted once
every part landed. Rank 0's part from prefill rank 0 is the main one: it always exists (both
hold KV head 0), and its receiver decides cancels and fallbacks as with one rank.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from pdserve.api.errors import CapacityExceeded, PdserveError
from pdserve.api.kv_events import HEARTBEAT_S
from pdserve.api.messages import (
    ChannelAddress,
    LinkAddress,
    PrefillRequest,
    RankStatus,
    ReserveReply,
    StepOutputs,
    Timings,
    TokenDelta,
    Usage,
    WorkerStatus,
)
from pdserve.decode_worker.token_link import TokenLink
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine_thread import EngineThread
from pdserve.engine.event_publisher import EventPublisher
from pdserve.engine.gang import end_gang
from pdserve.engine.kv_transfer.messages import TransferDone
from pdserve.engine.kv_transfer.receiver import Incoming, KVReceiver
from pdserve.engine.kv_transfer.routes import Route, kv_routes
from pdserve.engine.llm_engine import LLMEngine, StepOutput
from pdserve.engine.parallel import TPGroup, lead

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


@dataclass
class _Parts:
    """A transfer's parts, by (decode rank, prefill rank), that have not landed yet, and what
    the landed ones brought: the main part's closing message and transfer time, and the KV
    bytes of all."""

    awaiting: set[tuple[int, int]]
    done: TransferDone | None = None
    transfer_s: float = 0.0
    nbytes: int = 0


class DecodeService:
    """KV channels listen on `host` (the node's cluster address) and accept only peers that
    prove the cluster's `secret`."""

    def __init__(
        self,
        worker_id: str,
        config: EngineConfig,
        host: str,
        secret: bytes,
        transfer_timeout_s: float,
        ranks: Sequence[Any] = (),
        node: str = "",
    ) -> None:
        self.worker_id = worker_id
        self.tp = TPGroup(0, 1 + len(ranks))
        self.engine = LLMEngine(config, self.tp)
        self._ranks = list(ranks)
        self._host, self._secret = host, secret
        self._node, self._timeout_s = node, transfer_timeout_s
        self._block_size = config.block_size
        # Set on the event loop when a prefill worker opens its channels: its routes, and the
        # epoch of each part's channel, by (decode rank, prefill rank).
        self._routes: dict[str, list[Route]] = {}
        self._epochs: dict[str, dict[tuple[int, int], int]] = {}
        self._parts: dict[str, _Parts] = {}  # on the engine thread: transfers in flight
        # NOTE: the idle tick publishes the KV events' heartbeat while nothing runs.
        self._core = EngineThread(f"engine-{worker_id}", self._step, HEARTBEAT_S)
        self._receiver = self._new_receiver(self._admit, self._release, self._fall_back)
        self._extra: dict[int, KVReceiver] = {}  # from prefill ranks > 0, by prefill rank
        self._events = EventPublisher(worker_id, self.engine)
        self._link = TokenLink(host, self._on_link_request)
        self._outbox: list[TokenDelta] = []
        self._requests: dict[str, _RequestInfo] = {}
        self.num_fallbacks = 0

    async def start(self) -> None:
        await lead(self.tp, self._ranks, self._host, self.engine.device, self._timeout_s)
        self._events.attach(asyncio.get_running_loop())
        self._core.start()

    # --- the RPC surface (on the event loop; the work runs on the engine thread) ------------

    async def open_channel(
        self, prefill_id: str, prefill_tp: int
    ) -> tuple[tuple[int, int, ChannelAddress], ...]:
        """Hosts the channels of a prefill worker of TP size `prefill_tp`, one per route, on the
        ranks they end at; returns (prefill rank, decode rank, address) of each."""
        routes = kv_routes(self.engine.model_config.num_kv_heads, prefill_tp, self.tp.size)

        def sources(d: int) -> list[tuple[int, slice]]:
            return [(r.prefill_rank, r.dst) for r in routes if r.decode_rank == d]

        hosted = await asyncio.gather(
            self._core.call(self._open_own, prefill_id, sources(0)),
            *(h.open_channel.remote(prefill_id, sources(d)) for d, h in enumerate(self._ranks, 1)),
        )
        self._routes[prefill_id] = routes
        self._epochs[prefill_id] = {
            (d, p): a.epoch for d, addrs in enumerate(hosted) for p, a in addrs
        }
        return tuple((p, d, a) for d, addrs in enumerate(hosted) for p, a in addrs)

    async def reserve(self, req: PrefillRequest, prefill_id: str, epoch: int) -> ReserveReply:
        """Holds blocks for a request's KV; the reply says how many leading tokens this worker
        holds already (only the rest is sent). Every rank expects its part before the reply
        goes, so no chunk can arrive unannounced."""
        reply, block_ids = await self._core.call(self._reserve, req, prefill_id, epoch)
        if reply.transfer_id < 0 or not self._ranks:
            return reply
        aid = req.attempt_id
        num_tokens = len(req.prompt_token_ids) + len(req.output_token_ids)
        epochs = self._epochs.get(prefill_id, {})
        part = (block_ids, num_tokens, reply.cached_tokens, reply.transfer_id)
        try:
            expected = await asyncio.gather(
                *(
                    h.expect.remote(
                        aid, prefill_id, [(p, e) for (dr, p), e in epochs.items() if dr == d], *part
                    )
                    for d, h in enumerate(self._ranks, 1)
                )
            )
        except Exception:  # a rank is gone: the reservation must not outlive the call
            await self._core.call(self._release_attempt, aid)
            raise
        if all(expected):
            return reply
        await self._core.call(self._release_attempt, aid)
        return ReserveReply(stale_channel=True)

    async def rank_landed(
        self, attempt_id: str, rank: int, source: int, error: str, nbytes: int
    ) -> None:
        """Rank `rank`'s part of a transfer from prefill rank `source` landed (`error` empty,
        `nbytes` of KV) or failed."""
        self._core.post(self._part_landed, attempt_id, (rank, source), error, nbytes)

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
        others = await asyncio.gather(*(r.status.remote() for r in self._ranks))
        return await self._core.call(self._status, tuple(others))

    async def token_link(self) -> LinkAddress:
        """Where the router connects to take this worker's step outputs and hand it requests
        (`pdserve.api.token_link`); a new connection replaces the earlier one."""
        return self._link.open()

    async def inject_stall(self, seconds: float) -> None:
        """Chaos hook: the engine thread blocks for `seconds`, as a hung step would."""
        self._core.post(time.sleep, seconds)

    def _on_link_request(self, req: PrefillRequest) -> None:
        """A request the router sent over the token link (on the link's thread)."""
        self._core.post(self._prefill_locally, req, time.monotonic())

    # --- channels and requests (on the engine thread) ---------------------------------------

    def _new_receiver(self, on_done, on_cancel, on_failed) -> KVReceiver:
        return KVReceiver(
            self._host,
            self._secret,
            self.engine.kv_cache,
            self._block_size,
            self._timeout_s,
            post=self._core.post,
            on_done=on_done,
            on_cancel=on_cancel,
            on_failed=on_failed,
        )

    def _open_own(
        self, prefill_id: str, sources: list[tuple[int, slice]]
    ) -> list[tuple[int, ChannelAddress]]:
        """This rank's channels from the prefill worker's ranks `sources` (with the local heads
        each carries)."""
        out = []
        for p, heads in sources:
            if p == 0:
                receiver = self._receiver
            else:
                receiver = self._extra.get(p)
                if receiver is None:
                    receiver = self._extra[p] = self._new_receiver(
                        partial(self._part_done, p),
                        partial(self._part_closed, p),
                        partial(self._part_failed, p),
                    )
            out.append((p, receiver.open_channel(prefill_id, heads)))
        return out

    def _part_done(self, p: int, inc: Incoming, msg: TransferDone) -> None:
        if self._extra[p].close(inc):
            error = "" if inc.complete else f"incomplete transfer from prefill rank {p}"
            self._part_landed(inc.attempt_id, (0, p), error, inc.bytes_landed)

    def _part_closed(self, p: int, inc: Incoming) -> None:
        self._extra[p].close(inc)  # the main part hears the cancel too

    def _part_failed(self, p: int, inc: Incoming, reason: str) -> None:
        if self._extra[p].close(inc):
            self._part_landed(inc.attempt_id, (0, p), reason, 0)

    def _reserve(
        self, req: PrefillRequest, prefill_id: str, epoch: int
    ) -> tuple[ReserveReply, list[int]]:
        extra = {p: e for (d, p), e in self._epochs.get(prefill_id, {}).items() if d == 0 and p > 0}
        if not self._receiver.channel_ok(prefill_id, epoch) or not all(
            self._extra[p].channel_ok(prefill_id, e) for p, e in extra.items()
        ):
            return ReserveReply(stale_channel=True), []
        aid = req.attempt_id
        try:
            cached = self.engine.reserve(
                aid, req.prompt_token_ids, req.params, req.output_token_ids
            )
        except CapacityExceeded:
            # NOTE: busy blocks are no reason to refuse: the request waits in this engine's
            # queue and is computed here once blocks free (the scheduler preempts if it must).
            self._prefill_locally(req, time.monotonic())
            return ReserveReply(queued_here=True), []
        except PdserveError as e:
            return ReserveReply(error_code=e.grpc_code, error=str(e)), []
        num_tokens = len(req.prompt_token_ids) + len(req.output_token_ids)
        block_ids = self.engine.block_ids(aid)
        inc = self._receiver.expect(aid, prefill_id, block_ids, num_tokens, held=cached)
        for p in extra:
            self._extra[p].expect(aid, prefill_id, block_ids, num_tokens, cached, inc.transfer_id)
        self._requests[aid] = _RequestInfo(len(req.prompt_token_ids), prefilled_by=prefill_id)
        parts = {(r.decode_rank, r.prefill_rank) for r in self._routes.get(prefill_id, ())}
        self._parts[aid] = _Parts(parts - {(0, 0)})
        return ReserveReply(transfer_id=inc.transfer_id, cached_tokens=cached), block_ids

    def _prefill_locally(self, req: PrefillRequest, arrived: float) -> bool:
        aid = req.attempt_id
        inc = self._receiver.get(aid)
        if inc is not None:
            self._fall_back(inc, "the prefill side reported a failure")
            return True
        parts = self._parts.get(aid)
        if parts is not None and parts.done is not None:  # the main part landed, another won't
            self._fall_back_closed(aid, "the prefill side reported a failure")
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
        self._forget_parts(attempt_id)
        self._requests.pop(attempt_id, None)
        return self.engine.abort(attempt_id)

    def _release_attempt(self, attempt_id: str) -> None:
        inc = self._receiver.get(attempt_id)
        if inc is not None:
            self._release(inc)

    def _forget_parts(self, attempt_id: str) -> None:
        """The request's blocks are given up: the other ranks stop writing into them.

        NOTE: their `close` is queued before the blocks can be reserved again, and Ray runs
        one caller's calls to an actor in order, so it lands before that reservation's
        `expect`. A block that this worker's own prefill takes over is written by a step that
        another rank may run before its `close` lands; a chunk still arriving for the old
        transfer could then overwrite it. That needs a prefill worker still sending after this
        worker gave the transfer up (an abort, or rank 0's part failing first), and is not
        guarded against yet."""
        if self._parts.pop(attempt_id, None) is not None:
            for receiver in self._extra.values():
                inc = receiver.get(attempt_id)
                if inc is not None:
                    receiver.close(inc)
            for r in self._ranks:
                r.close.remote(attempt_id)

    # --- transfers ending (posted by the receiver) ------------------------------------------

    def _admit(self, inc: Incoming, msg: TransferDone) -> None:
        """The transfer is complete: the request queues for the running batch with its first
        token."""
        if not self._receiver.close(inc):
            return
        aid = inc.attempt_id
        if not inc.complete:
            self._fall_back_closed(aid, f"incomplete transfer (layers reached {inc.layer_end})")
            return
        parts = self._parts[aid]
        parts.done, parts.transfer_s = msg, self._receiver.transfer_seconds(inc, msg)
        parts.nbytes += inc.bytes_landed
        self._admit_if_landed(aid, parts)

    def _part_landed(self, attempt_id: str, part: tuple[int, int], error: str, nbytes: int) -> None:
        parts = self._parts.get(attempt_id)
        if parts is None:
            return  # the request went another way already
        if error:
            inc = self._receiver.get(attempt_id)
            if inc is None or self._receiver.close(inc):
                self._fall_back_closed(attempt_id, error)
            return
        parts.awaiting.discard(part)
        parts.nbytes += nbytes
        self._admit_if_landed(attempt_id, parts)

    def _admit_if_landed(self, attempt_id: str, parts: _Parts) -> None:
        """Admits the request once the main part and every other part have landed."""
        msg = parts.done
        if msg is None or parts.awaiting:
            return
        del self._parts[attempt_id]
        info = self._requests[attempt_id]
        info.cached_prompt_tokens = msg.cached_prompt_tokens
        info.timings = Timings(msg.queue_s, msg.prefill_s, parts.transfer_s, parts.nbytes)
        out = self.engine.admit_prefilled(attempt_id, msg.first_token, msg.first_logprobs)
        self._emit([out])

    def _release(self, inc: Incoming) -> None:
        if self._receiver.close(inc):
            self._forget_parts(inc.attempt_id)
            self._requests.pop(inc.attempt_id, None)
            self.engine.abort(inc.attempt_id)

    def _fall_back(self, inc: Incoming, reason: str) -> None:
        if self._receiver.close(inc):
            self._fall_back_closed(inc.attempt_id, reason)

    def _fall_back_closed(self, attempt_id: str, reason: str) -> None:
        self.num_fallbacks += 1
        logger.warning("attempt %s: KV transfer failed (%s); prefilling here", attempt_id, reason)
        self._forget_parts(attempt_id)
        self._requests[attempt_id].prefilled_by = ""
        self.engine.fall_back(attempt_id)

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
            self._link.send(StepOutputs(self.worker_id, tuple(self._outbox)))
            self._outbox = []
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
            if self.tp.size > 1:
                # NOTE: the ranks may have stopped at different collectives (a rank died in
                # one): only a new gang can step again; the router resumes the requests.
                end_gang("decode step failed")
            logger.exception("decode step failed; ending the requests in it")
            for receiver in (self._receiver, *self._extra.values()):
                receiver.close_all()  # no late KV may land in the blocks freed next
            aborted = self.engine.abort_all()
            for aid in aborted:
                self._forget_parts(aid)
            self._fail(aborted, f"decode step failed: {e}")
            self._flush()
            return True
        self._emit(outputs)
        self._flush()
        return bool(outputs) or self.engine.stats().running > 0

    def _status(self, others: tuple[RankStatus, ...]) -> WorkerStatus:
        rank = RankStatus(
            0,
            self._node,
            self.engine.weight_bytes,
            self.engine.kv_cache_bytes,
            sum(r.bytes_received for r in (self._receiver, *self._extra.values())),
        )
        return self.engine.stats().worker_status(
            self.worker_id,
            "decode",
            (rank, *others),
            kv_blocks_received=self._receiver.blocks_received,
            kv_bytes_received=sum(r.kv_bytes for r in (rank, *others)),
            transfer_fallbacks=self.num_fallbacks,
        )
