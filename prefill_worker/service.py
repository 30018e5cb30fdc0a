"""The prefill worker: batches prompts, computes their KV, ships it to decode workers.

Prompts are batched by the engine's scheduler under its token budget (long prompts are
chunked), and the engine samples the first token. A prompt starts computing while its block
reservation travels to the decode worker; once it lands, each layer's KV of each request is
gathered and sent (isend) as soon as that layer is done, so the transfer overlaps the
following layers. The DONE message with the first token closes a transfer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pdserve.api.errors import NotFound, PdserveError, TransferFailed
from pdserve.api.messages import ChannelAddress, PrefillRequest, PrefillResult, WorkerStatus
from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_transfer import SENDER, KVChannel, gather_tokens, token_slots
from pdserve.engine.llm_engine import LLMEngine, StepOutput
from pdserve.engine.scheduler import ScheduledSeq

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Channel:
    decode_id: str
    kv: KVChannel
    epoch: int
    fail_after_messages: int | None = None


@dataclass(eq=False)
class _Transfer:
    """One request's KV on its way to a decode worker.

    The prompt computes while the reservation travels: until it lands (`channel is None`),
    finished layers wait in `stash` and a sampled first token in `first`.
    """

    request: PrefillRequest
    done: asyncio.Future[PrefillResult]
    arrived: float
    transfer_id: int = -1
    channel: _Channel | None = None
    cached_tokens: int = 0
    stash: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)
    first: tuple[int, list[float]] | None = None
    started: float | None = None
    transfer_s: float = 0.0
    failed: bool = False


class PrefillService:
    """`decode_handle(worker_id)` returns the Ray handle of a decode worker (its leader rank)."""

    def __init__(
        self,
        worker_id: str,
        config: EngineConfig,
        transfer_timeout_s: float,
        decode_handle: Callable[[str], Any],
        threads: int = 1,
    ) -> None:
        torch.set_num_threads(threads)
        self.worker_id = worker_id
        self.engine = LLMEngine(config)
        self.timeout_s = transfer_timeout_s
        self._decode_handle = decode_handle
        self._channels: dict[str, _Channel] = {}
        self._opening: dict[str, asyncio.Task] = {}
        self._transfers: dict[str, _Transfer] = {}
        self._wake = asyncio.Event()
        self.kv_bytes_sent = 0

    async def start(self) -> None:
        asyncio.get_running_loop().create_task(self._step_loop())

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        rid = req.request_id
        if rid in self._transfers:
            return PrefillResult(rid, False, "ALREADY_EXISTS", f"request {rid!r} is in flight")
        try:
            self.engine.check_request(rid, req.prompt_token_ids, req.output_token_ids)
        except PdserveError as e:
            return PrefillResult(rid, False, e.grpc_code, str(e))
        t = _Transfer(req, asyncio.get_running_loop().create_future(), time.monotonic())
        self._transfers[rid] = t
        # The prefill engine only samples the first token; the decode worker does the rest.
        first_only = dataclasses.replace(req.params, max_tokens=1)
        self.engine.add_request(rid, req.prompt_token_ids, first_only, req.output_token_ids)
        self._wake.set()
        try:
            t.transfer_id, t.channel, t.cached_tokens = await self._reserve(req)
        except TransferFailed as e:
            self._drop(t)
            if not t.done.done():  # no channel to the decode worker: it prefills the request
                logger.warning("request %s: %s; the decode worker prefills it", rid, e)
                await self._decode_handle(req.decode_worker).prefill_locally.remote(req)
                t.done.set_result(PrefillResult(rid, True))
            return await t.done
        except Exception as e:  # refused (a PdserveError), or the decode worker is unreachable
            self._drop(t)
            code = e.grpc_code if isinstance(e, PdserveError) else "UNAVAILABLE"
            if not t.done.done():
                t.done.set_result(PrefillResult(rid, False, code, f"{req.decode_worker}: {e}"))
            return await t.done
        if t.done.done():  # aborted, or a failed step, while the reservation travelled
            self._cancel(t)
            return t.done.result()
        for layer, start, payload in t.stash:
            self._send_kv(t, layer, start, payload)
        t.stash = []
        if t.first is not None:
            self._send_done(t)
        return await t.done

    def _drop(self, t: _Transfer) -> None:
        if self._transfers.get(t.request.request_id) is t:
            del self._transfers[t.request.request_id]
            self.engine.abort(t.request.request_id)

    async def _reserve(self, req: PrefillRequest) -> tuple[int, _Channel, int]:
        """Reserves blocks on the decode worker: (transfer id, channel, cached tokens)."""
        decode = self._decode_handle(req.decode_worker)
        for _ in range(2):
            chan = await self._channel(req.decode_worker)
            reply = await decode.reserve.remote(req, self.worker_id, chan.epoch)
            if not reply.stale_channel:
                break
            self._drop_channel(chan)
        else:
            raise TransferFailed(f"no usable KV channel to {req.decode_worker}")
        if reply.error_code:
            raise _RemoteError(reply.error_code, reply.error or "")
        return reply.transfer_id, chan, reply.cached_tokens

    async def _channel(self, decode_id: str) -> _Channel:
        chan = self._channels.get(decode_id)
        if chan is not None and not chan.kv.broken:
            return chan
        task = self._opening.get(decode_id)
        if task is None:
            task = asyncio.ensure_future(self._open(decode_id))
            self._opening[decode_id] = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._opening.pop(decode_id, None)

    async def _open(self, decode_id: str) -> _Channel:
        addr: ChannelAddress = await self._decode_handle(decode_id).open_channel.remote(
            self.worker_id
        )
        try:
            kv = await asyncio.to_thread(
                KVChannel.join, addr.host, addr.port, SENDER, self.engine.device, self.timeout_s
            )
        except Exception as e:  # the store or the group could not be reached
            raise TransferFailed(f"cannot join the KV channel of {decode_id}: {e}") from e
        old = self._channels.get(decode_id)
        if old is not None:
            self._drop_channel(old)
        chan = _Channel(decode_id, kv, addr.epoch)
        self._channels[decode_id] = chan
        logger.info("KV channel to %s open (epoch %d)", decode_id, addr.epoch)
        return chan

    def _drop_channel(self, chan: _Channel) -> None:
        """Closes the channel, so a receiver blocked on it fails at once rather than at its
        timeout; the next request to that decode worker builds a new one."""
        self.kv_bytes_sent += chan.kv.bytes_sent
        chan.kv.bytes_sent = 0
        chan.kv.close()
        if self._channels.get(chan.decode_id) is chan:
            del self._channels[chan.decode_id]

    def _channel_failed(self, chan: _Channel, error: Exception) -> None:
        """Every transfer on a failed channel is given up; the decode worker sees the channel
        close and prefills those requests itself."""
        logger.warning("KV channel to %s failed: %s", chan.decode_id, error)
        for t in self._transfers.values():
            if t.channel is chan:
                t.failed = True
        self._drop_channel(chan)

    async def abort(self, request_id: str) -> bool:
        transfer = self._transfers.pop(request_id, None)
        if transfer is None:
            return False
        self.engine.abort(request_id)
        self._cancel(transfer)
        transfer.done.set_result(PrefillResult(request_id, False, "CANCELLED", "aborted"))
        return True

    def _cancel(self, transfer: _Transfer) -> None:
        if transfer.channel is None:
            return  # prefill() cancels it once the reservation lands
        try:
            transfer.channel.kv.send_cancel(transfer.transfer_id)
            transfer.channel.kv.flush()
        except TransferFailed as e:
            logger.warning("could not cancel transfer %d: %s", transfer.transfer_id, e)

    def inject_fault(self, decode_id: str, after_messages: int) -> None:
        """Chaos hook: close the channel to `decode_id` after it sends `after_messages` more
        messages, as a dying link would, mid-transfer."""
        chan = self._channels.get(decode_id)
        if chan is None:
            raise NotFound(f"no KV channel to {decode_id}")
        chan.fail_after_messages = after_messages

    # --- the step loop ----------------------------------------------------------------------

    async def _step_loop(self) -> None:
        while True:
            if not self.engine.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outputs = self.engine.step(self._ship_layer)
            except Exception as e:  # the loop must outlive a bad step, or every request hangs
                logger.exception("prefill step failed; ending the requests in it")
                self._fail_all(f"prefill step failed: {e}")
                continue
            self._flush_channels()
            for out in outputs:
                self._finish(out)
            self._keep_alive()
            await asyncio.sleep(0)

    def _fail_all(self, error: str) -> None:
        self.engine.abort_all()
        for rid, t in list(self._transfers.items()):
            del self._transfers[rid]
            self._cancel(t)
            t.done.set_result(PrefillResult(rid, False, "INTERNAL", error))

    def _keep_alive(self) -> None:
        """Queued transfers send nothing for a while; tell their receivers the peer lives."""
        now = time.monotonic()
        transfers = [t for t in self._transfers.values() if t.channel is not None]
        for chan in {id(t.channel): t.channel for t in transfers}.values():
            live = self._channels.get(chan.decode_id) is chan
            if live and now - chan.kv.last_send > self.timeout_s / 4:
                try:
                    chan.kv.send_keepalive()
                    chan.kv.flush()
                except TransferFailed as e:
                    self._channel_failed(chan, e)

    def _ship_layer(self, scheduled: list[ScheduledSeq], layer: int) -> None:
        """Runs inside the forward pass, right after `layer` wrote its KV."""
        now = time.monotonic()
        for item in scheduled:
            seq = item.seq
            t = self._transfers.get(seq.request_id)
            if t is None or t.failed:
                continue
            if t.started is None:
                t.started = now
            start = seq.num_computed
            if t.channel is not None:
                start = max(start, t.cached_tokens)
            end = seq.num_computed + item.num_tokens
            if start >= end:
                continue
            slots = token_slots(
                seq.block_ids, self.engine.config.block_size, start, end, self.engine.device
            )
            payload = gather_tokens(self.engine.kv_cache, layer, slots, slice(None))
            if t.channel is None:
                t.stash.append((layer, start, payload))
            else:
                self._send_kv(t, layer, start, payload)

    def _send_kv(self, t: _Transfer, layer: int, start: int, payload: torch.Tensor) -> None:
        """Sends the tokens of `payload` that the decode worker does not hold already."""
        skip = max(0, t.cached_tokens - start)
        if skip < payload.shape[0]:
            self._send(t, KVChannel.send_kv, t.transfer_id, layer, start + skip, payload[skip:])

    def _send(self, t: _Transfer, op: Callable[..., None], *args) -> None:
        chan = t.channel
        try:
            if chan.fail_after_messages is not None:
                if chan.fail_after_messages <= 0:
                    raise TransferFailed("channel closed by an injected fault")
                chan.fail_after_messages -= 1
            op(chan.kv, *args)
        except TransferFailed as e:
            self._channel_failed(chan, e)

    def _flush_channels(self) -> None:
        t0 = time.monotonic()
        channels = {
            id(t.channel): t.channel
            for t in self._transfers.values()
            if t.channel is not None and not t.failed
        }
        for chan in channels.values():
            try:
                chan.kv.flush()
            except TransferFailed as e:
                self._channel_failed(chan, e)
        elapsed = time.monotonic() - t0
        for t in self._transfers.values():
            t.transfer_s += elapsed

    def _finish(self, out: StepOutput) -> None:
        """The first token is sampled: close the transfer with DONE (or leave that to
        `prefill()` if the reservation has not landed yet)."""
        t = self._transfers.get(out.request_id)
        if t is None:
            return
        now = time.monotonic()
        started = t.started or now
        lp = out.logprobs
        values = [
            started - t.arrived,
            now - started,
            t.transfer_s,
            lp.logprob if lp is not None else 0.0,
        ]
        if lp is not None and lp.top:
            values += [float(tok) for tok, _ in lp.top] + [v for _, v in lp.top]
        t.first = (out.new_token_ids[0], values)
        if t.channel is not None:
            self._send_done(t)

    def _send_done(self, t: _Transfer) -> None:
        """Closes the transfer and answers the caller. A failed transfer still answers ok: the
        decode worker notices the broken channel and prefills the request itself."""
        if self._transfers.get(t.request.request_id) is t:
            del self._transfers[t.request.request_id]
        if not t.failed:
            self._send(t, KVChannel.send_done, t.transfer_id, *t.first)
            try:
                t.channel.kv.flush()
            except TransferFailed as e:
                self._channel_failed(t.channel, e)
        if not t.done.done():
            t.done.set_result(PrefillResult(t.request.request_id, True))

    async def status(self) -> WorkerStatus:
        e = self.engine
        live = sum(c.kv.bytes_sent for c in self._channels.values())
        return WorkerStatus(
            worker_id=self.worker_id,
            role="prefill",
            tp=1,
            running=e.num_running,
            waiting=len(e.scheduler.waiting),
            free_blocks=e.pool.num_free,
            total_blocks=e.pool.num_blocks,
            prompt_tokens_computed=e.num_prompt_tokens_computed,
            kv_bytes_sent=self.kv_bytes_sent + live,
        )


class _RemoteError(PdserveError):
    """An error a decode worker reported, carrying its gRPC status name."""

    def __init__(self, grpc_code: str, message: str) -> None:
        super().__init__(message)
        self.grpc_code = grpc_code
