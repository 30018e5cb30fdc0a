"""The decode worker: receives KV from prefill workers, decodes continuously, streams tokens.

Everything that touches the engine runs on the actor's event loop between steps, so a
reservation or an abort is answered while the step loop runs without locking the engine.
KV arrives on one receiver thread per channel, which writes into blocks reserved for the
transfer (never used by the engine until admission) under the reservation's lock, so an abort
that frees those blocks can never race with a late write.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pdserve.api.errors import PdserveError
from pdserve.api.messages import (
    ChannelAddress,
    PrefillRequest,
    ReserveReply,
    StepOutputs,
    Timings,
    TokenDelta,
    TokenLogprobs,
    Usage,
    WorkerStatus,
)
from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_transfer import (
    KIND_CANCEL,
    KIND_DONE,
    KIND_KEEPALIVE,
    KIND_KV,
    RECEIVER,
    KVChannel,
    Message,
    scatter_tokens,
    token_slots,
)
from pdserve.engine.llm_engine import LLMEngine, StepOutput

logger = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0002


@dataclass(eq=False)
class Reservation:
    """Blocks held for one incoming transfer. `layer_end[i]` is how far layer i's tokens have
    arrived without a gap; a sender that recomputes a preempted prompt re-sends ranges from
    the start, which only overwrites slots with the same values."""

    transfer_id: int
    request: PrefillRequest
    block_ids: list[int]
    num_tokens: int
    channel: _Channel
    layer_end: list[int]
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    def record(self, layer: int, start: int, n: int) -> None:
        if start <= self.layer_end[layer]:
            self.layer_end[layer] = max(self.layer_end[layer], start + n)

    @property
    def complete(self) -> bool:
        return min(self.layer_end) >= self.num_tokens


@dataclass(eq=False)
class _Channel:
    """The receiving end of one prefill worker's channel and the transfers expected on it."""

    prefill_id: str
    epoch: int
    kv: KVChannel | None = None
    expected: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)
    alive: bool = True


@dataclass
class _RequestInfo:
    prompt_tokens: int
    completion_tokens: int = 0
    timings: Timings = field(default_factory=Timings)


class DecodeService:
    def __init__(
        self,
        worker_id: str,
        config: EngineConfig,
        host: str,
        transfer_timeout_s: float,
        threads: int = 1,
    ) -> None:
        torch.set_num_threads(threads)
        # NOTE: the KV receiver threads (and Ray's RPC threads) need the GIL back after every
        # blocking call while the step loop holds it; at Python's default 5 ms switch interval
        # each message of a transfer could wait that long. Measured with `pdserve bench` at
        # 8 req/s: TTFT p50 221 -> 188 ms, TPOT p50 16.3 -> 9.7 ms. (The prefill worker, whose
        # step is the long one, is better off with the default.)
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.worker_id = worker_id
        self.engine = LLMEngine(config)
        self.host = host
        self.timeout_s = transfer_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._stream: asyncio.Queue[StepOutputs] = asyncio.Queue()
        self._outbox: list[TokenDelta] = []
        self._channels: dict[str, _Channel] = {}
        self._reservations: dict[str, Reservation] = {}
        self._by_transfer: dict[int, Reservation] = {}
        self._requests: dict[str, _RequestInfo] = {}
        self._transfer_ids = itertools.count(1)
        self._epochs = itertools.count(1)
        self.kv_bytes_received = 0
        self.num_fallbacks = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.create_task(self._step_loop())

    # --- channels -------------------------------------------------------------------------

    async def open_channel(self, prefill_id: str) -> ChannelAddress:
        """Hosts a new channel for `prefill_id` (replacing any old one) and returns where to
        join it. The receiver thread starts serving once the prefill side has joined."""
        old = self._channels.pop(prefill_id, None)
        if old is not None:
            self._close_channel(old, "replaced by a new channel")
        store = KVChannel.host_store(self.host, self.timeout_s)
        chan = _Channel(prefill_id, next(self._epochs))
        self._channels[prefill_id] = chan
        threading.Thread(
            target=self._serve_channel,
            args=(chan, store),
            daemon=True,
            name=f"kv-recv-{prefill_id}",
        ).start()
        return ChannelAddress(self.host, store.port, chan.epoch)

    def _serve_channel(self, chan: _Channel, store: dist.TCPStore) -> None:
        try:
            chan.kv = KVChannel.join(
                self.host, store.port, RECEIVER, self.engine.device, self.timeout_s, store
            )
            while True:
                with chan.cond:
                    chan.cond.wait_for(lambda: chan.expected > 0 or not chan.alive)
                    if not chan.alive:
                        return
                self._handle(chan, chan.kv.recv())
        except Exception as e:  # any failure ends this channel; its transfers fall back
            logger.warning("KV channel from %s failed: %s", chan.prefill_id, e)
            self._call_soon(self._close_channel, chan, str(e))
        finally:
            if chan.kv is not None:
                self._call_soon(self._count_bytes, chan.kv)

    def _handle(self, chan: _Channel, msg: Message) -> None:
        """Runs on the receiver thread."""
        res = self._by_transfer.get(msg.transfer_id)
        if res is not None and res.channel is not chan:
            res = None
        if msg.kind == KIND_KV:
            if res is None:
                return
            with res.lock:
                if not res.closed:
                    n = msg.payload.shape[0]
                    slots = token_slots(
                        res.block_ids,
                        self.engine.config.block_size,
                        msg.token_start,
                        msg.token_start + n,
                        self.engine.device,
                    )
                    scatter_tokens(self.engine.kv_cache, msg.layer, slots, slice(None), msg.payload)
                    res.record(msg.layer, msg.token_start, n)
            return
        if msg.kind == KIND_KEEPALIVE:
            return
        with chan.cond:
            chan.expected -= 1
        if res is not None and msg.kind == KIND_DONE:
            self._call_soon(self._admit, res, msg)
        elif res is not None and msg.kind == KIND_CANCEL:
            self._call_soon(self._release, res)

    def _call_soon(self, fn, *args) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _count_bytes(self, kv: KVChannel) -> None:
        self.kv_bytes_received += kv.bytes_received

    def _close_channel(self, chan: _Channel, reason: str) -> None:
        """Every transfer still expected on the channel falls back to local prefill."""
        with chan.cond:
            chan.alive = False
            chan.cond.notify_all()
        if self._channels.get(chan.prefill_id) is chan:
            del self._channels[chan.prefill_id]
        if chan.kv is not None and not chan.kv.broken:
            chan.kv.close()
        for res in [r for r in self._reservations.values() if r.channel is chan]:
            self._fall_back(res, reason)

    # --- requests ---------------------------------------------------------------------------

    async def reserve(self, req: PrefillRequest, prefill_id: str, epoch: int) -> ReserveReply:
        chan = self._channels.get(prefill_id)
        if chan is None or chan.epoch != epoch or not chan.alive:
            return ReserveReply(stale_channel=True)
        try:
            tokens = self.engine.check_request(
                req.request_id, req.prompt_token_ids, req.output_token_ids
            )
            if req.request_id in self._reservations:
                raise PdserveError(f"request {req.request_id!r} already has a reservation")
            num_blocks = self.engine.scheduler.blocks_needed(len(tokens))
            blocks = self.engine.pool.allocate(num_blocks)
        except PdserveError as e:
            return ReserveReply(error_code=e.grpc_code, error=str(e))
        layers = [0] * self.engine.model_config.num_layers
        res = Reservation(next(self._transfer_ids), req, blocks, len(tokens), chan, layers)
        self._reservations[req.request_id] = res
        self._by_transfer[res.transfer_id] = res
        self._requests[req.request_id] = _RequestInfo(len(req.prompt_token_ids))
        with chan.cond:
            chan.expected += 1
            chan.cond.notify_all()
        return ReserveReply(transfer_id=res.transfer_id, cached_tokens=0)

    def _admit(self, res: Reservation, msg: Message) -> None:
        """The transfer is complete: the request joins the running batch with its first token."""
        if self._reservations.get(res.request.request_id) is not res:
            return
        with res.lock:
            complete = res.complete
            if complete:
                res.closed = True
        if not complete:
            self._fall_back(res, f"incomplete transfer (layers reached {res.layer_end})")
            return
        self._forget(res)
        req = res.request
        values = msg.payload.tolist()
        queue_s, prefill_s, transfer_s, logprob = values[:4]
        top = values[4:]
        lp = None
        if req.params.logprobs is not None:
            n = len(top) // 2
            lp = TokenLogprobs(
                msg.first_token, logprob, tuple((int(t), v) for t, v in zip(top[:n], top[n:]))
            )
        self._requests[req.request_id].timings = Timings(queue_s, prefill_s, transfer_s)
        try:
            out = self.engine.add_prefilled(
                req.request_id,
                req.prompt_token_ids,
                req.params,
                res.block_ids,
                msg.first_token,
                lp,
                req.output_token_ids,
            )
        except PdserveError as e:  # refused before the blocks changed hands
            self.engine.pool.free(res.block_ids)
            self._fail([req.request_id], f"admission failed: {e}")
            return
        self._emit([out])

    def _fall_back(self, res: Reservation, reason: str) -> None:
        """Frees the reservation and prefills the request here instead."""
        if not self._close(res):
            return
        self.num_fallbacks += 1
        req = res.request
        logger.warning(
            "request %s: KV transfer failed (%s); prefilling locally", req.request_id, reason
        )
        self.engine.add_request(
            req.request_id, req.prompt_token_ids, req.params, req.output_token_ids
        )

    def _release(self, res: Reservation) -> None:
        if self._close(res):
            self._requests.pop(res.request.request_id, None)

    def _close(self, res: Reservation) -> bool:
        """Frees the reservation's blocks, once; False if it was closed already. The lock makes
        sure the receiver thread never writes into blocks that were given back."""
        with res.lock:
            if res.closed:
                return False
            res.closed = True
            self.engine.pool.free(res.block_ids)
        self._forget(res)
        self._wake.set()  # the freed blocks may unblock waiting requests
        return True

    def _forget(self, res: Reservation) -> None:
        self._reservations.pop(res.request.request_id, None)
        self._by_transfer.pop(res.transfer_id, None)

    async def abort(self, request_id: str) -> bool:
        res = self._reservations.get(request_id)
        if res is not None:
            self._release(res)
            return True
        self._requests.pop(request_id, None)
        self._wake.set()
        return self.engine.abort(request_id)

    async def prefill_locally(self, req: PrefillRequest) -> bool:
        """Prefills a request here, for when no prefill worker can hand its KV over. A request
        this worker already knows (a reservation, or running) is left as it is."""
        rid = req.request_id
        if rid in self._reservations or self.engine.has_request(rid):
            return True
        self.engine.add_request(rid, req.prompt_token_ids, req.params, req.output_token_ids)
        self._requests[rid] = _RequestInfo(len(req.prompt_token_ids))
        self.num_fallbacks += 1
        self._wake.set()
        return True

    def _fail(self, request_ids: list[str], error: str) -> None:
        for rid in request_ids:
            self._requests.pop(rid, None)
            self._outbox.append(TokenDelta(rid, (), finish_reason="error", error=error))
        self._wake.set()

    # --- the step loop and the token stream -------------------------------------------------

    def _emit(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            info = self._requests.get(out.request_id)
            usage = timings = None
            if info is not None:
                # NOTE: timings ride on the first delta too, so a request that the router ends
                # early (a stop string) still reports them.
                if info.completion_tokens == 0 or out.finished:
                    timings = info.timings
                info.completion_tokens += len(out.new_token_ids)
                if out.finished:
                    del self._requests[out.request_id]
                    usage = Usage(info.prompt_tokens, 0, info.completion_tokens)
            self._outbox.append(
                TokenDelta(
                    out.request_id,
                    out.new_token_ids,
                    (out.logprobs,) if out.logprobs is not None else (),
                    out.finish_reason if out.finished else None,
                    usage,
                    timings,
                )
            )
        self._wake.set()

    async def _step_loop(self) -> None:
        while True:
            if self._outbox:
                self._stream.put_nowait(StepOutputs(self.worker_id, tuple(self._outbox)))
                self._outbox = []
            if not self.engine.has_unfinished():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # the loop must outlive a bad step, or every request hangs
                logger.exception("decode step failed; ending the requests in it")
                self._fail(self.engine.abort_all(), f"decode step failed: {e}")
                continue
            self._emit(outputs)
            if not outputs and not self.engine.scheduler.running:
                # Waiting requests need blocks that reservations hold: sleep until some return.
                self._wake.clear()
                await self._wake.wait()
                continue
            await asyncio.sleep(0)

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

    async def status(self) -> WorkerStatus:
        e = self.engine
        live = sum(c.kv.bytes_received for c in self._channels.values() if c.kv is not None)
        return WorkerStatus(
            worker_id=self.worker_id,
            role="decode",
            tp=1,
            running=e.num_running,
            waiting=len(e.scheduler.waiting) + len(self._reservations),
            free_blocks=e.pool.num_free,
            total_blocks=e.pool.num_blocks,
            prompt_tokens_computed=e.num_prompt_tokens_computed,
            kv_bytes_received=self.kv_bytes_received + live,
            transfer_fallbacks=self.num_fallbacks,
        )
