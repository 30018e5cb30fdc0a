"""The prefill side of KV transfer: channels to decode workers and the transfers on them.

A prompt starts computing while its reservation travels to the decode worker. Each layer's KV
of each request is gathered into one staging buffer and sent (isend) as soon as the layer is
done, so the transfer overlaps the following layers; until the reservation lands, finished
layers wait in a stash. The reservation says how many leading tokens the decode worker holds
already: only the tokens after them are sent, including ones this worker took from its own
prefix cache rather than computing. `TransferDone` with the first sampled token closes a
transfer.

Threads: the transfers and every send belong to the prefill worker's engine thread
(`begin`, `landed`, `ship_layer`, `finish`, `cancel`, `abort`, `flush_all`, `keep_alive`); only
`reserve` and `connect` (channel set-up and the reservation RPC) run on the event loop. The
channel table, which both touch, is guarded by a lock, and a channel is closed only on the
engine thread (`post` takes it there), never under a send.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pdserve.api.block_hash import blocks_for
from pdserve.api.errors import NotFound, RemoteError, TransferFailed
from pdserve.api.messages import ChannelAddress, PrefillRequest, ReserveReply
from pdserve.engine.kv_transfer.channel import KVChannel
from pdserve.engine.kv_transfer.links import Links
from pdserve.engine.kv_transfer.messages import (
    KeepAlive,
    KVChunk,
    Message,
    TransferCancel,
    TransferDone,
)
from pdserve.engine.kv_transfer.orders import (
    CloseChannels,
    Drop,
    Flush,
    Gather,
    Order,
    Relay,
    SendChunk,
    encode_orders,
)
from pdserve.engine.kv_transfer.routes import kv_routes
from pdserve.engine.kv_transfer.slots import gather_tokens, token_slots
from pdserve.engine.llm_engine import StepOutput
from pdserve.engine.parallel import TPGroup
from pdserve.engine.scheduler import ScheduledSeq
from pdserve.engine.step_broadcast import send_orders

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Channel:
    """This rank's channels to one decode worker. `epoch` is that of the channel to the
    decode worker's rank 0 (which its reservations check)."""

    decode_id: str
    kv: Links
    epoch: int
    fail_after_messages: int | None = None  # chaos hook: see `inject_fault`
    stall: bool = False
    unlinked: bool = False


@dataclass(eq=False)
class Outgoing:
    """One request's KV on its way to a decode worker. Until the reservation lands (`channel
    is None`), finished layers wait in `stash` and the closing message in `done_msg`. `reply`
    is the decode worker's answer to the reservation, set on the event loop as it comes; the
    engine thread applies it (`landed`) at the next layer of a running step, or after it."""

    request: PrefillRequest
    num_layers: int
    transfer_id: int = -1
    channel: _Channel | None = None
    decode_cached: int = 0
    layer_sent: list[int] = field(default_factory=list)
    stash: list[KVChunk] = field(default_factory=list)
    done_msg: TransferDone | None = None
    first_sent_at: float | None = None
    failed: bool = False
    reply: tuple[ReserveReply, _Channel] | None = None

    def __post_init__(self) -> None:
        self.layer_sent = [0] * self.num_layers


class KVSender:
    """`decode_handle(worker_id)` returns the Ray handle of a decode worker (its leader rank);
    `block_ids(attempt_id)` the blocks of a request in the local engine. `num_kv_heads` is the
    model's (all ranks'): with `tp` (this worker's ranks) it says which heads go where.

    In a tensor-parallel prefill worker this sender runs on rank 0 and `ranks` are the Ray
    handles of the others: each joins its own channels, and every decision here that touches
    KV or a channel is also an order (`orders.py`) that `publish()` hands to them. Channels
    listen on `host` and prove the cluster's `secret` to the decode side."""

    def __init__(
        self,
        worker_id: str,
        host: str,
        secret: bytes,
        kv_cache: torch.Tensor,
        num_kv_heads: int,
        tp: TPGroup,
        block_size: int,
        block_ids: Callable[[str], list[int]],
        decode_handle: Callable[[str], Any],
        timeout_s: float,
        post: Callable[..., None],
        ranks: Sequence[Any] = (),
    ) -> None:
        self.worker_id = worker_id
        self._ranks = list(ranks)
        self._orders: list[Order] | None = [] if ranks else None
        self._host = host
        self._secret = secret
        self._kv_cache = kv_cache
        self._num_kv_heads = num_kv_heads
        self._tp = tp
        self._block_size = block_size
        self._block_ids = block_ids
        self._decode_handle = decode_handle
        self._timeout_s = timeout_s
        self._post = post
        self._channels: dict[str, _Channel] = {}
        self._channels_lock = threading.Lock()
        self._opening: dict[str, asyncio.Task[_Channel]] = {}
        self._handshake_faults: dict[str, bool] = {}  # decode id -> stall (chaos hook)
        self._transfers: dict[str, Outgoing] = {}
        self._closed_bytes = 0
        self.blocks_sent = 0

    @property
    def bytes_sent(self) -> int:
        with self._channels_lock:
            live = sum(c.kv.bytes_sent for c in self._channels.values())
            return self._closed_bytes + live

    def begin(self, req: PrefillRequest) -> Outgoing:
        t = Outgoing(req, self._kv_cache.shape[0])
        self._transfers[req.attempt_id] = t
        return t

    def forget(self, t: Outgoing) -> None:
        if self._transfers.get(t.request.attempt_id) is t:
            del self._transfers[t.request.attempt_id]
            self._order(Drop(t.request.attempt_id))

    def publish(self) -> None:
        """Hands the orders made since the last call to the other ranks (on the engine thread,
        after a step: before the next one can reuse a block they read)."""
        if self._orders:
            send_orders(self._tp, encode_orders(self._orders), self._kv_cache.device)
            self._orders = []

    def _order(self, order: Order) -> None:
        if self._orders is not None:
            self._orders.append(order)

    async def connect(self, decode_id: str) -> None:
        """Opens the channel to a decode worker ahead of its first request."""
        await self._channel(decode_id)

    async def reserve(self, t: Outgoing) -> ReserveReply:
        """Reserves blocks on the decode worker (on the event loop) and leaves the reply in
        `t.reply` for `landed`. Raises `TransferFailed` when no channel can be had,
        `RemoteError` when the decode worker says no."""
        req = t.request
        decode = self._decode_handle(req.decode_worker)
        for _ in range(2):
            chan = await self._channel(req.decode_worker)
            reply = await decode.reserve.remote(req, self.worker_id, chan.epoch)
            if not reply.stale_channel:
                break
            self._unlink(chan)
            self._post(self._close_channel, chan)
        else:
            raise TransferFailed(f"no usable KV channel to {req.decode_worker}")
        if reply.error_code:
            raise RemoteError(reply.error_code, reply.error or "")
        t.reply = (reply, chan)
        return reply

    def landed(self, t: Outgoing) -> bool:
        """The reservation in `t.reply` is in: sends what waited for it, unless a layer of the
        step that was running applied it already. True if that closed the transfer (its first
        token was sampled already).

        NOTE: applied at the next layer, a reservation that lands while the prompt computes
        lets the remaining layers go out as they finish, not all after the step: at 2 req/s
        (tiny model, 128-token prompts) the first token reached the router p50 9 ms after the
        prefill step ended."""
        if t.channel is not None or t.reply is None:
            return False
        reply, chan = t.reply
        t.transfer_id, t.channel, t.decode_cached = reply.transfer_id, chan, reply.cached_tokens
        if self._transfers.get(t.request.attempt_id) is not t:
            self.cancel(t)  # aborted while the reservation travelled
            return False
        for chunk in t.stash:
            self._send_chunk(t, chunk)
        t.stash = []
        if t.done_msg is None:
            return False
        self._close(t)
        return True

    def ship_layer(self, scheduled: list[ScheduledSeq], layer: int) -> None:
        """Runs inside the forward pass, right after `layer` wrote its KV."""
        for item in scheduled:
            t = self._transfers.get(item.seq.request_id)
            if t is None or t.failed:
                continue
            if t.channel is None and t.reply is not None:
                self.landed(t)  # its reservation came in during this step
            # NOTE: the first chunk also covers the prompt tokens taken from this worker's own
            # prefix cache (never computed here, but possibly missing on the decode worker).
            start = max(t.layer_sent[layer], t.decode_cached)
            end = item.seq.num_computed + item.num_tokens
            if start >= end:
                continue
            t.layer_sent[layer] = end
            slots = token_slots(
                self._block_ids(item.seq.request_id),
                self._block_size,
                start,
                end,
                self._kv_cache.device,
            )
            chunk = KVChunk(
                t.transfer_id, layer, start, gather_tokens(self._kv_cache, layer, slots)
            )
            if self._orders is not None:
                flat = (slots[0] * self._block_size + slots[1]).tolist()
                self._order(Gather(item.seq.request_id, layer, start, flat))
            if t.channel is None:
                t.stash.append(chunk)
            else:
                self._send_chunk(t, chunk)

    def finish(self, out: StepOutput) -> Outgoing | None:
        """The first token is sampled: close the transfer (now, or once the reservation
        lands). Returns the transfer, or None if it is not this sender's."""
        t = self._transfers.get(out.request_id)
        if t is None:
            return None
        t.done_msg = TransferDone(
            t.transfer_id,
            out.new_token_ids[0],
            out.logprobs,
            out.cached_prompt_tokens,
            out.queue_s,
            out.prefill_s,
            first_sent_at=None,
        )
        if t.channel is not None:
            self._close(t)
        return t

    def _close(self, t: Outgoing) -> None:
        """Sends DONE. A failed transfer sends nothing: the decode worker sees the broken
        channel and prefills the request itself."""
        self.forget(t)
        if t.failed:
            return
        bs = self._block_size
        self.blocks_sent += max(0, blocks_for(t.layer_sent[0], bs) - t.decode_cached // bs)
        msg = t.done_msg
        done = TransferDone(
            t.transfer_id,
            msg.first_token,
            msg.first_logprobs,
            msg.cached_prompt_tokens,
            msg.queue_s,
            msg.prefill_s,
            t.first_sent_at,
        )
        self._send(t, done)
        self._order(Relay(t.channel.decode_id, t.channel.epoch, done))
        self._flush(t.channel)

    def cancel(self, t: Outgoing) -> None:
        """Gives a transfer up; the decode worker frees its reservation."""
        self.forget(t)
        if t.channel is None or t.failed:
            return  # `reserve` cancels it once the reservation lands
        self._send(t, TransferCancel(t.transfer_id))
        self._order(Relay(t.channel.decode_id, t.channel.epoch, TransferCancel(t.transfer_id)))
        self._flush(t.channel)

    def abort(self, attempt_id: str) -> Outgoing | None:
        t = self._transfers.get(attempt_id)
        if t is not None:
            self.cancel(t)
        return t

    def fail_all(self) -> list[Outgoing]:
        transfers = list(self._transfers.values())
        for t in transfers:
            self.cancel(t)
        return transfers

    def flush_all(self) -> None:
        """Waits for every queued send (after a step); a failed channel fails its transfers."""
        live = {id(t.channel): t.channel for t in self._transfers.values() if t.channel}
        for chan in live.values():
            self._flush(chan)

    def keep_alive(self) -> None:
        """Transfers queued behind other prompts send nothing for a while; tell their
        receivers the peer lives."""
        now = time.monotonic()
        live = {id(t.channel): t.channel for t in self._transfers.values() if t.channel}
        for chan in live.values():
            fresh = now - chan.kv.last_send <= self._timeout_s / 4
            faulty = chan.fail_after_messages is not None  # an injected fault: no keep-alives
            if fresh or faulty or self._channels.get(chan.decode_id) is not chan:
                continue
            self._order(Relay(chan.decode_id, chan.epoch, KeepAlive()))
            self._order(Flush(chan.decode_id, chan.epoch))
            try:
                chan.kv.send(KeepAlive())
                chan.kv.flush()
            except TransferFailed as e:
                self._channel_failed(chan, e)

    def inject_fault(self, decode_id: str, after_messages: int | None, stall: bool) -> None:
        """Chaos hook: the channel to `decode_id` breaks as a dying link would. With
        `after_messages`, the open channel does after sending that many more messages; with
        None, the next channel to it does at its handshake (the open one is closed). A broken
        channel closes (the decode worker sees it fail at once), or with `stall` goes silent
        (it sees nothing until its timeout); at the handshake, closing is a peer without the
        cluster's secret."""
        chan = self._channels.get(decode_id)
        if after_messages is None:
            self._handshake_faults[decode_id] = stall
            if chan is not None:
                self._unlink(chan)
                chan.kv.close()
            return
        if chan is None:
            raise NotFound(f"no KV channel to {decode_id}")
        chan.fail_after_messages, chan.stall = after_messages, stall

    def _send_chunk(self, t: Outgoing, chunk: KVChunk) -> None:
        """Sends the tokens of `chunk` that the decode worker does not hold already."""
        skip = max(0, t.decode_cached - chunk.token_start)
        n = chunk.payload.shape[0]
        if skip >= n:
            return
        start = chunk.token_start + skip
        if t.first_sent_at is None:
            t.first_sent_at = time.time()
        self._send(t, KVChunk(t.transfer_id, chunk.layer, start, chunk.payload[skip:]))
        c = t.channel
        self._order(
            SendChunk(
                t.request.attempt_id,
                c.decode_id,
                c.epoch,
                t.transfer_id,
                chunk.layer,
                chunk.token_start,
                start,
                n - skip,
            )
        )

    def _send(self, t: Outgoing, msg: Message) -> None:
        chan = t.channel
        try:
            if chan.fail_after_messages is not None:
                if chan.fail_after_messages <= 0:
                    if chan.stall:
                        return
                    raise TransferFailed("channel closed by an injected fault")
                chan.fail_after_messages -= 1
            chan.kv.send(msg)
        except TransferFailed as e:
            self._channel_failed(chan, e)

    def _flush(self, chan: _Channel) -> None:
        self._order(Flush(chan.decode_id, chan.epoch))
        try:
            chan.kv.flush()
        except TransferFailed as e:
            self._channel_failed(chan, e)

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
        """Joins the channels that the decode worker's ranks host for this worker's ranks
        (one per route; this rank joins its own, the other ranks theirs)."""
        hosted: tuple[tuple[int, int, ChannelAddress], ...] = await self._decode_handle(
            decode_id
        ).open_channel.remote(self.worker_id, self._tp.size)
        decode_tp = len({d for _, d, _ in hosted})
        routes = kv_routes(self._num_kv_heads, self._tp.size, decode_tp)
        addrs = {(p, d): a for p, d, a in hosted}
        mine = [r for r in routes if r.prefill_rank == self._tp.rank]
        device, timeout = self._kv_cache.device, self._timeout_s
        epoch = addrs[0, 0].epoch
        secret = self._secret
        stall = self._handshake_faults.pop(decode_id, None)
        if stall:
            await asyncio.sleep(self._timeout_s)
            raise TransferFailed(f"the handshake with {decode_id} stalled (an injected fault)")
        if stall is not None:
            secret = b"not the cluster's secret"
        others = [
            handle.join_channels.remote(
                decode_id,
                epoch,
                [(r, addrs[r.prefill_rank, r.decode_rank]) for r in routes if r.prefill_rank == i],
            )
            for i, handle in enumerate(self._ranks, start=1)
        ]
        joined = await asyncio.gather(
            *(
                asyncio.to_thread(
                    KVChannel.connect, a.host, a.port, self._host, device, timeout, secret
                )
                for a in (addrs[r.prefill_rank, r.decode_rank] for r in mine)
            ),
            *others,
            return_exceptions=True,
        )
        kvs = [j for j in joined[: len(mine)] if isinstance(j, KVChannel)]
        failed = [j for j in joined if isinstance(j, BaseException)]
        if failed:  # a store or a group could not be reached
            for kv in kvs:
                kv.close()
            self._post(self._order, CloseChannels(decode_id, epoch))  # the other ranks' joins
            raise TransferFailed(f"cannot join the KV channel of {decode_id}: {failed[0]}")
        chan = _Channel(decode_id, Links(list(zip(mine, kvs))), epoch)
        with self._channels_lock:
            old = self._channels.get(decode_id)
            self._channels[decode_id] = chan
        if old is not None:
            self._unlink(old)
            self._post(self._close_channel, old)
        logger.info("KV channel to %s open (epoch %d)", decode_id, chan.epoch)
        return chan

    def _unlink(self, chan: _Channel) -> None:
        """Takes the channel out of the table (the next request to that decode worker builds a
        new one); its bytes move to the closed count."""
        with self._channels_lock:
            if self._channels.get(chan.decode_id) is chan:
                del self._channels[chan.decode_id]
            if not chan.unlinked:
                chan.unlinked = True
                self._closed_bytes += chan.kv.bytes_sent

    def _channel_failed(self, chan: _Channel, error: Exception) -> None:
        """Every transfer on a failed channel is given up; the decode worker sees the channel
        close and prefills those requests itself."""
        logger.warning("KV channel to %s failed: %s", chan.decode_id, error)
        for t in self._transfers.values():
            if t.channel is chan:
                t.failed = True
        self._unlink(chan)
        # NOTE: closing makes a receiver blocked on the channel fail at once rather than at its
        # timeout. On the engine thread: no send of this worker can be under way.
        self._close_channel(chan)

    def _close_channel(self, chan: _Channel) -> None:
        """On the engine thread."""
        chan.kv.close()
        self._order(CloseChannels(chan.decode_id, chan.epoch))
