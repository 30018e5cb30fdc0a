"""The decode side of KV transfer: hosted channels, and the incoming transfers on them.

One receiver thread per channel writes each arriving chunk into the blocks the engine reserved
for its request, under the transfer's lock, so a close that gives those blocks back can never
race with a late write. Everything else (a transfer completing, cancelled, or failing) is
handed to the owner's thread through `post` and the callbacks; the receiver decides nothing
about the request itself.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pdserve.api.block_hash import blocks_for
from pdserve.api.messages import ChannelAddress
from pdserve.engine.kv_transfer.channel import RECEIVER, KVChannel
from pdserve.engine.kv_transfer.messages import KeepAlive, KVChunk, TransferCancel, TransferDone
from pdserve.engine.kv_transfer.slots import scatter_tokens, token_slots

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Incoming:
    """KV expected for one request. `layer_end[i]` is how far layer i's tokens have arrived
    without a gap (from the tokens the engine held already); a sender that recomputes a
    preempted prompt re-sends ranges, which only overwrites slots with the same values."""

    transfer_id: int
    attempt_id: str
    channel: _Channel
    block_ids: list[int]
    num_tokens: int
    layer_end: list[int]
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False
    last_landed: float | None = None
    bytes_landed: int = 0

    def record(self, layer: int, start: int, n: int) -> None:
        if start <= self.layer_end[layer]:
            self.layer_end[layer] = max(self.layer_end[layer], start + n)

    @property
    def complete(self) -> bool:
        return min(self.layer_end) >= self.num_tokens


@dataclass(eq=False)
class _Channel:
    prefill_id: str
    epoch: int
    kv: KVChannel | None = None
    expected: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)
    alive: bool = True


class KVReceiver:
    """Apart from the receiver threads, every method runs on the owner's thread (the decode
    worker's engine thread). `post(fn, *args)` runs `fn` there; through it run the callbacks
    `on_done(incoming, msg)`, `on_cancel(incoming)` and `on_failed(incoming, reason)`."""

    def __init__(
        self,
        host: str,
        kv_cache: torch.Tensor,
        block_size: int,
        timeout_s: float,
        post: Callable[..., None],
        on_done: Callable[[Incoming, TransferDone], None],
        on_cancel: Callable[[Incoming], None],
        on_failed: Callable[[Incoming, str], None],
    ) -> None:
        self.host = host
        self._kv_cache = kv_cache
        self._block_size = block_size
        self._timeout_s = timeout_s
        self._post = post
        self._on_done, self._on_cancel, self._on_failed = on_done, on_cancel, on_failed
        self._channels: dict[str, _Channel] = {}
        self._by_attempt: dict[str, Incoming] = {}
        self._by_transfer: dict[int, Incoming] = {}
        self._transfer_ids = itertools.count(1)
        self._epochs = itertools.count(1)
        self._closed_bytes = 0
        self.blocks_received = 0

    @property
    def bytes_received(self) -> int:
        live = sum(c.kv.bytes_received for c in self._channels.values() if c.kv is not None)
        return self._closed_bytes + live

    def get(self, attempt_id: str) -> Incoming | None:
        return self._by_attempt.get(attempt_id)

    def open_channel(self, prefill_id: str) -> ChannelAddress:
        """Hosts a new channel for `prefill_id` (replacing any old one) and returns where to
        join it. The receiver thread starts serving once the prefill side has joined."""
        old = self._channels.pop(prefill_id, None)
        if old is not None:
            self._close_channel(old, "replaced by a new channel")
        store = KVChannel.host_store(self.host, self._timeout_s)
        chan = _Channel(prefill_id, next(self._epochs))
        self._channels[prefill_id] = chan
        threading.Thread(
            target=self._serve,
            args=(chan, store),
            daemon=True,
            name=f"kv-recv-{prefill_id}",
        ).start()
        return ChannelAddress(self.host, store.port, chan.epoch)

    def channel_ok(self, prefill_id: str, epoch: int) -> bool:
        chan = self._channels.get(prefill_id)
        return chan is not None and chan.epoch == epoch and chan.alive

    def expect(
        self, attempt_id: str, prefill_id: str, block_ids: list[int], num_tokens: int, held: int
    ) -> Incoming:
        """Registers a transfer into `block_ids`, whose first `held` tokens are there already."""
        chan = self._channels[prefill_id]
        layers = [held] * self._kv_cache.shape[0]
        inc = Incoming(next(self._transfer_ids), attempt_id, chan, block_ids, num_tokens, layers)
        self._by_attempt[attempt_id] = inc
        self._by_transfer[inc.transfer_id] = inc
        with chan.cond:
            chan.expected += 1
            chan.cond.notify_all()
        return inc

    def close(self, inc: Incoming) -> bool:
        """Stops writing into the transfer's blocks, once; False if it was closed already.
        After this the owner may give the blocks back."""
        with inc.lock:
            if inc.closed:
                return False
            inc.closed = True
        if self._by_attempt.get(inc.attempt_id) is inc:
            del self._by_attempt[inc.attempt_id]
        self._by_transfer.pop(inc.transfer_id, None)
        return True

    def close_all(self) -> None:
        """Stops writing into every open transfer's blocks (before the owner frees them all)."""
        for inc in list(self._by_attempt.values()):
            self.close(inc)

    def transfer_seconds(self, inc: Incoming, msg: TransferDone) -> float:
        """From the first chunk sent to the last one landed (wall clock, both sides)."""
        if msg.first_sent_at is None or inc.last_landed is None:
            return 0.0
        return max(0.0, inc.last_landed - msg.first_sent_at)

    def _serve(self, chan: _Channel, store: dist.TCPStore) -> None:
        try:
            chan.kv = KVChannel.join(
                self.host, store.port, RECEIVER, self._kv_cache.device, self._timeout_s, store
            )
            if not chan.alive:  # closed (replaced) while it was being joined
                chan.kv.close()
                return
            while True:
                with chan.cond:
                    chan.cond.wait_for(lambda: chan.expected > 0 or not chan.alive)
                    if not chan.alive:
                        return
                self._handle(chan, chan.kv.recv())
        except Exception as e:  # any failure ends this channel; its transfers fail
            logger.warning("KV channel from %s failed: %s", chan.prefill_id, e)
            self._post(self._close_channel, chan, str(e))

    def _handle(self, chan: _Channel, msg) -> None:
        """Runs on the receiver thread."""
        if isinstance(msg, KeepAlive):
            return
        inc = self._by_transfer.get(msg.transfer_id)
        if inc is not None and inc.channel is not chan:
            inc = None
        if isinstance(msg, KVChunk):
            if inc is not None:
                self._write(inc, msg)
            return
        with chan.cond:
            chan.expected -= 1
        if inc is None:
            return
        if isinstance(msg, TransferDone):
            self._post(self._on_done, inc, msg)
        elif isinstance(msg, TransferCancel):
            self._post(self._on_cancel, inc)

    def _write(self, inc: Incoming, chunk: KVChunk) -> None:
        n = chunk.payload.shape[0]
        with inc.lock:
            if inc.closed:
                return
            slots = token_slots(
                inc.block_ids,
                self._block_size,
                chunk.token_start,
                chunk.token_start + n,
                self._kv_cache.device,
            )
            scatter_tokens(self._kv_cache, chunk.layer, slots, chunk.payload)
            inc.record(chunk.layer, chunk.token_start, n)
            inc.last_landed = time.time()
            inc.bytes_landed += chunk.payload.numel() * chunk.payload.element_size()
            if chunk.layer == 0:  # a block counts when its first token lands
                end = chunk.token_start + n
                self.blocks_received += blocks_for(end, self._block_size) - blocks_for(
                    chunk.token_start, self._block_size
                )

    def _close_channel(self, chan: _Channel, reason: str) -> None:
        """Every transfer still expected on the channel fails (once, however often the channel
        is closed: replaced, and then its receive fails)."""
        with chan.cond:
            if not chan.alive:
                return
            chan.alive = False
            chan.cond.notify_all()
        if self._channels.get(chan.prefill_id) is chan:
            del self._channels[chan.prefill_id]
        if chan.kv is not None:
            self._closed_bytes += chan.kv.bytes_received
            if not chan.kv.broken:
                chan.kv.close()
        for inc in [i for i in self._by_attempt.values() if i.channel is chan]:
            self._on_failed(inc, reason)
