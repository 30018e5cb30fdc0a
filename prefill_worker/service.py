"""The prefill worker: batches prompts, computes their KV, ships it to decode workers.

Prompts are batched by the engine's scheduler under its token budget (long prompts are
chunked, cached prefixes skipped), and the engine samples the first token. The KV goes out
through `KVSender` layer by layer while the following layers compute. When no channel to the
decode worker can be had, this worker reports it to the decode worker, which decides (it
prefills the request itself).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from pdserve.api.errors import PdserveError, TransferFailed
from pdserve.api.messages import PrefillRequest, PrefillResult, WorkerStatus
from pdserve.engine.config import EngineConfig
from pdserve.engine.event_publisher import EventPublisher
from pdserve.engine.kv_transfer.sender import KVSender, Outgoing
from pdserve.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)


class PrefillService:
    """`decode_handle(worker_id)` returns the Ray handle of a decode worker (its leader rank)."""

    def __init__(
        self,
        worker_id: str,
        config: EngineConfig,
        transfer_timeout_s: float,
        decode_handle: Callable[[str], Any],
    ) -> None:
        self.worker_id = worker_id
        self.engine = LLMEngine(config)
        self._decode_handle = decode_handle
        self._sender = KVSender(
            worker_id,
            self.engine.kv_cache,
            config.block_size,
            self.engine.block_ids,
            decode_handle,
            transfer_timeout_s,
        )
        self._results: dict[str, asyncio.Future[PrefillResult]] = {}
        self._events = EventPublisher(worker_id, self.engine)
        self._wake = asyncio.Event()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._events.attach(loop)
        loop.create_task(self._step_loop())

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
        try:
            self.engine.add_request(aid, req.prompt_token_ids, first_only, req.output_token_ids)
        except PdserveError as e:
            return PrefillResult(aid, False, e.grpc_code, str(e))
        done = asyncio.get_running_loop().create_future()
        self._results[aid] = done
        t = self._sender.begin(req)
        self._wake.set()
        try:
            await self._sender.reserve(t)
        except TransferFailed as e:
            self._drop(t)
            if not done.done():  # no channel to the decode worker: it decides what to do
                logger.warning("attempt %s: %s; reporting to %s", aid, e, req.decode_worker)
                await self._decode_handle(req.decode_worker).prefill_locally.remote(req)
                done.set_result(PrefillResult(aid, True))
        except Exception as e:  # refused (a PdserveError), or the decode worker is unreachable
            self._drop(t)
            code = e.grpc_code if isinstance(e, PdserveError) else "UNAVAILABLE"
            if not done.done():
                done.set_result(PrefillResult(aid, False, code, f"{req.decode_worker}: {e}"))
        else:
            if t.done_msg is not None and not done.done():  # sent as the reservation landed
                done.set_result(PrefillResult(aid, True))
        try:
            return await done
        finally:
            if self._results.get(aid) is done:
                del self._results[aid]

    async def abort(self, attempt_id: str) -> bool:
        done = self._results.get(attempt_id)
        if done is None or done.done():
            return False
        self.engine.abort(attempt_id)
        self._sender.abort(attempt_id)
        done.set_result(PrefillResult(attempt_id, False, "CANCELLED", "aborted"))
        return True

    def inject_fault(self, decode_id: str, after_messages: int) -> None:
        self._sender.inject_fault(decode_id, after_messages)

    def kv_snapshot(self) -> bytes:
        return self._events.snapshot()

    def kv_events(self) -> AsyncIterator[bytes]:
        return self._events.stream()

    def _drop(self, t: Outgoing) -> None:
        self._sender.forget(t)
        self.engine.abort(t.request.attempt_id)

    async def _step_loop(self) -> None:
        while True:
            if not self.engine.has_unfinished():
                self._events.publish()
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outputs = self.engine.step(self._sender.ship_layer)
            except Exception as e:  # the loop must outlive a bad step, or every request hangs
                logger.exception("prefill step failed; ending the requests in it")
                self._fail_all(f"prefill step failed: {e}")
                continue
            self._sender.flush_all()
            for out in outputs:
                t = self._sender.finish(
                    out.request_id, out.new_token_ids[0], out.logprobs, out.cached_prompt_tokens
                )
                done = self._results.get(out.request_id)
                # NOTE: a transfer whose reservation has not landed is answered by `prefill`.
                if t is not None and t.channel is not None and done and not done.done():
                    done.set_result(PrefillResult(out.request_id, True))
            self._sender.keep_alive()
            self._events.publish()
            await asyncio.sleep(0)

    def _fail_all(self, error: str) -> None:
        self.engine.abort_all()
        self._sender.fail_all()
        for aid, done in list(self._results.items()):
            del self._results[aid]
            if not done.done():
                done.set_result(PrefillResult(aid, False, "INTERNAL", error))

    async def status(self) -> WorkerStatus:
        return self.engine.stats().worker_status(
            self.worker_id,
            "prefill",
            kv_blocks_sent=self._sender.blocks_sent,
            kv_bytes_sent=self._sender.bytes_sent,
        )
