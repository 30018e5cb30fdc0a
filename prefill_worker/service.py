"""The prefill worker: batches prompts, computes their KV, ships it to decode workers.

Prompts are batched by the engine's scheduler under its token budget (long prompts are
chunked, cached prefixes skipped), and the engine samples the first token. The KV goes out
through `KVSender` layer by layer while the following layers compute. When no channel to the
decode worker can be had, this worker reports it to the decode worker, which decides (it
prefills the request itself).

The engine, the transfers and every send live on an `EngineThread`; the event loop keeps the
RPCs, the reservation round trip and each call's answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from pdserve.api.errors import PdserveError, TransferFailed
from pdserve.api.kv_events import HEARTBEAT_S
from pdserve.api.messages import PrefillRequest, PrefillResult, RankStatus, WorkerStatus
from pdserve.api.sampling import SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.engine.engine_thread import EngineThread
from pdserve.engine.event_publisher import EventPublisher
from pdserve.engine.gang import end_gang
from pdserve.engine.kv_transfer.sender import KVSender, Outgoing
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.parallel import TPGroup, lead

logger = logging.getLogger(__name__)


class PrefillService:
    """`decode_handle(worker_id)` returns the Ray handle of a decode worker (its leader rank).
    KV channels listen on `host` (the node's cluster address) and prove the cluster's
    `secret`."""

    def __init__(
        self,
        worker_id: str,
        config: EngineConfig,
        host: str,
        secret: bytes,
        transfer_timeout_s: float,
        decode_handle: Callable[[str], Any],
        node: str = "",
        ranks: Sequence[Any] = (),
    ) -> None:
        self.worker_id = worker_id
        self._node, self._host, self._timeout_s = node, host, transfer_timeout_s
        self._ranks = list(ranks)
        self.tp = TPGroup(0, 1 + len(ranks))
        self.engine = LLMEngine(config, self.tp)
        # NOTE: the idle tick publishes the KV events' heartbeat while nothing runs.
        self._core = EngineThread(f"engine-{worker_id}", self._step, HEARTBEAT_S)
        self._decode_handle = decode_handle
        self._sender = KVSender(
            worker_id,
            host,
            secret,
            self.engine.kv_cache,
            self.engine.model_config.num_kv_heads,
            self.engine.tp,
            config.block_size,
            self.engine.block_ids,
            decode_handle,
            transfer_timeout_s,
            post=self._core.post,
            ranks=ranks,
        )
        self._events = EventPublisher(worker_id, self.engine)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._results: dict[str, asyncio.Future[PrefillResult]] = {}  # on the event loop

    async def start(self) -> None:
        await lead(self.tp, self._ranks, self._host, self.engine.device, self._timeout_s)
        self._loop = asyncio.get_running_loop()
        self._events.attach(self._loop)
        self._core.start()

    # --- the RPC surface (on the event loop) ------------------------------------------------

    async def connect(self, decode_ids: list[str]) -> None:
        """Opens channels to decode workers ahead of their first request, so the channel set-up
        is off the first requests' critical path. A failure is only logged: the first request
        to that worker tries again."""
        for outcome in await asyncio.gather(
            *(self._sender.connect(d) for d in decode_ids), return_exceptions=True
        ):
            if isinstance(outcome, Exception):
                logger.warning("could not open a KV channel ahead of time: %s", outcome)

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        aid = req.attempt_id
        if aid in self._results:
            return PrefillResult(aid, False, "ALREADY_EXISTS", f"attempt {aid!r} is in flight")
        # The prefill engine only samples the first token; the decode worker does the rest.
        first_only = dataclasses.replace(req.params, max_tokens=1)
        # NOTE: registered before the engine hears of it, so an abort that comes at any later
        # moment finds it (and reaches the engine thread after `_begin`).
        done = self._results[aid] = asyncio.get_running_loop().create_future()
        arrived = time.monotonic()
        try:
            try:
                t = await self._core.call(self._begin, req, first_only, arrived)
            except PdserveError as e:
                return PrefillResult(aid, False, e.grpc_code, str(e))
            if not done.done():
                await self._reserve(t, done)
            return await done
        except asyncio.CancelledError:
            self._core.post(self._abort, aid)  # the caller went away: nothing may linger
            raise
        finally:
            if self._results.get(aid) is done:
                del self._results[aid]

    async def _reserve(self, t: Outgoing, done: asyncio.Future[PrefillResult]) -> None:
        """Reserves the blocks on the decode worker; the answer goes to `done` unless the
        first token does it (or an abort did)."""
        req, aid = t.request, t.request.attempt_id
        try:
            reply = await self._sender.reserve(t)
        except TransferFailed as e:
            await self._core.call(self._drop, t)
            if not done.done():  # no channel to the decode worker: it decides what to do
                logger.warning("attempt %s: %s; reporting to %s", aid, e, req.decode_worker)
                await self._decode_handle(req.decode_worker).prefill_locally.remote(req)
                done.set_result(PrefillResult(aid, True))
        except Exception as e:  # refused (a PdserveError), or the decode worker is unreachable
            await self._core.call(self._drop, t)
            if isinstance(e, PdserveError):
                code, error = e.grpc_code, f"{req.decode_worker}: {e}"
            else:  # NOTE: the error names Ray's internals (actor id, pid, address): logged only
                logger.warning("attempt %s: %s is unreachable: %s", aid, req.decode_worker, e)
                code, error = "UNAVAILABLE", f"decode worker {req.decode_worker} is unreachable"
            if not done.done():
                done.set_result(PrefillResult(aid, False, code, error))
        else:
            if reply.queued_here:  # the decode worker computes it once its blocks free
                await self._core.call(self._drop, t)
                if not done.done():
                    done.set_result(PrefillResult(aid, True))
                return
            closed = await self._core.call(self._sender.landed, t)
            if closed and not done.done():  # the first token was waiting for the reservation
                done.set_result(PrefillResult(aid, True))

    async def abort(self, attempt_id: str) -> bool:
        done = self._results.get(attempt_id)
        if done is None or done.done():
            return False
        # NOTE: answered first, so a `prefill` waking from `_begin` does not reserve; the
        # engine thread runs `_abort` after `_begin` all the same (its inbox is FIFO).
        done.set_result(PrefillResult(attempt_id, False, "CANCELLED", "aborted"))
        return await self._core.call(self._abort, attempt_id)

    async def inject_stall(self, seconds: float) -> None:
        """Chaos hook: the engine thread blocks for `seconds`, as a hung step would."""
        self._core.post(time.sleep, seconds)

    async def inject_fault(
        self, decode_id: str, after_messages: int | None, stall: bool = False
    ) -> None:
        """Chaos hook: see `KVSender.inject_fault`."""
        await self._core.call(self._sender.inject_fault, decode_id, after_messages, stall)

    async def kv_snapshot(self) -> bytes:
        return await self._core.call(self._events.snapshot)

    def kv_events(self) -> AsyncIterator[bytes]:
        return self._events.stream()

    async def status(self) -> WorkerStatus:
        others = await asyncio.gather(*(r.status.remote() for r in self._ranks))
        return await self._core.call(self._status, tuple(others))

    def _answer(self, attempt_id: str, result: PrefillResult) -> None:
        """Answers a prefill call (on the event loop)."""
        done = self._results.get(attempt_id)
        if done is not None and not done.done():
            done.set_result(result)

    def _answer_from_engine(self, attempt_id: str, result: PrefillResult) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._answer, attempt_id, result)

    # --- on the engine thread ---------------------------------------------------------------

    def _begin(self, req: PrefillRequest, params: SamplingParams, arrived: float) -> Outgoing:
        self.engine.add_request(
            req.attempt_id, req.prompt_token_ids, params, req.output_token_ids, arrived
        )
        return self._sender.begin(req)

    def _drop(self, t: Outgoing) -> None:
        self._sender.forget(t)
        self.engine.abort(t.request.attempt_id)

    def _abort(self, attempt_id: str) -> bool:
        aborted = self.engine.abort(attempt_id)
        return self._sender.abort(attempt_id) is not None or aborted

    def _step(self) -> bool:
        try:
            return self._step_once()
        finally:
            self._sender.publish()  # what the other ranks do with their KV heads

    def _step_once(self) -> bool:
        if not self.engine.has_unfinished():
            self._events.publish(idle=True)
            return False
        try:
            outputs = self.engine.step(self._sender.ship_layer)
        except Exception as e:  # the loop must outlive a bad step, or every request hangs
            if self.tp.size > 1:
                # NOTE: the ranks may have stopped at different collectives (a rank died in
                # one): only a new gang can step again; the router prefills the requests
                # elsewhere.
                end_gang("prefill step failed")
            logger.exception("prefill step failed; ending the requests in it")
            self.engine.abort_all()
            for t in self._sender.fail_all():
                aid = t.request.attempt_id
                error = f"prefill step failed: {e}"
                self._answer_from_engine(aid, PrefillResult(aid, False, "INTERNAL", error))
            return True
        self._sender.flush_all()
        for out in outputs:
            t = self._sender.finish(out)
            # NOTE: a transfer whose reservation has not landed is answered by `prefill`.
            if t is not None and t.channel is not None:
                self._answer_from_engine(out.request_id, PrefillResult(out.request_id, True))
        self._sender.keep_alive()
        self._events.publish()
        return bool(outputs) or self.engine.stats().running > 0

    def _status(self, others: tuple[RankStatus, ...]) -> WorkerStatus:
        rank = RankStatus(
            0,
            self._node,
            self.engine.weight_bytes,
            self.engine.kv_cache_bytes,
            self._sender.bytes_sent,
        )
        return self.engine.stats().worker_status(
            self.worker_id,
            "prefill",
            (rank, *others),
            kv_blocks_sent=self._sender.blocks_sent,
            kv_bytes_sent=sum(r.kv_bytes for r in (rank, *others)),
        )
