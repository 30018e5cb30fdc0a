"""A rank other than 0 of a tensor-parallel decode worker.

It runs its shard of every step that rank 0 broadcasts (on a thread of its own, blocked in
the broadcast between steps), and receives exactly its KV heads from prefill workers on
channels of its own: one receiver per prefill rank that holds some of its heads. Rank 0
decides everything about a request: this rank registers the transfers rank 0 tells it of
(`expect`, with rank 0's block ids: every rank's pool mirrors rank 0's, since only rank 0
allocates), and tells rank 0 when each of its parts has landed or failed. The receivers'
callbacks and every RPC run on the actor's event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

from pdserve.api.messages import ChannelAddress, RankStatus
from pdserve.engine.config import EngineConfig
from pdserve.engine.gang import end_gang
from pdserve.engine.kv_transfer.messages import TransferDone
from pdserve.engine.kv_transfer.receiver import Incoming, KVReceiver
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.parallel import TPGroup


class DecodeRankService:
    """`leader()` returns the Ray handle of rank 0. KV channels listen on `host` (the node's
    cluster address) and accept only peers that prove the cluster's `secret`."""

    def __init__(
        self,
        tp: TPGroup,
        config: EngineConfig,
        host: str,
        secret: bytes,
        node: str,
        transfer_timeout_s: float,
        leader: Callable[[], Any],
    ) -> None:
        self.tp = tp
        self.engine = LLMEngine(config, tp)
        self._host, self._secret, self._node = host, secret, node
        self._block_size = config.block_size
        self._timeout_s = transfer_timeout_s
        self._leader = leader
        self._loop: asyncio.AbstractEventLoop | None = None
        self._receivers: dict[int, KVReceiver] = {}  # by prefill rank

    async def join(self, host: str, port: int) -> None:
        """Joins the worker's group (rank 0 hosts it) and starts following its steps."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.tp.join, host, port, self.engine.device, self._timeout_s)
        threading.Thread(target=self._follow, daemon=True, name="tp-follow").start()

    def open_channel(
        self, prefill_id: str, sources: list[tuple[int, slice]]
    ) -> list[tuple[int, ChannelAddress]]:
        """Hosts a channel from each of the prefill worker's ranks `sources` (with the local
        heads each carries)."""
        return [(p, self._receiver(p).open_channel(prefill_id, heads)) for p, heads in sources]

    def expect(
        self,
        attempt_id: str,
        prefill_id: str,
        parts: list[tuple[int, int]],
        block_ids: list[int],
        num_tokens: int,
        held: int,
        transfer_id: int,
    ) -> bool:
        """Registers this rank's parts of a transfer, one per (prefill rank, epoch of its
        channel); False when a channel is not the live one of that epoch (rank 0 then has the
        channels rebuilt)."""
        if not all(self._receiver(p).channel_ok(prefill_id, e) for p, e in parts):
            return False
        for p, _ in parts:
            self._receivers[p].expect(
                attempt_id, prefill_id, block_ids, num_tokens, held, transfer_id
            )
        return True

    def close(self, attempt_id: str) -> None:
        """Rank 0 gave the request's blocks up (abort, fallback): no more writes into them."""
        for receiver in self._receivers.values():
            inc = receiver.get(attempt_id)
            if inc is not None:
                receiver.close(inc)

    def status(self) -> RankStatus:
        return RankStatus(
            self.tp.rank,
            self._node,
            self.engine.weight_bytes,
            self.engine.kv_cache_bytes,
            sum(r.bytes_received for r in self._receivers.values()),
        )

    def _receiver(self, p: int) -> KVReceiver:
        receiver = self._receivers.get(p)
        if receiver is None:
            receiver = self._receivers[p] = KVReceiver(
                self._host,
                self._secret,
                self.engine.kv_cache,
                self._block_size,
                self._timeout_s,
                post=self._post,
                on_done=partial(self._landed, p),
                on_cancel=partial(self._cancelled, p),
                on_failed=partial(self._failed, p),
            )
        return receiver

    def _follow(self) -> None:
        try:
            while True:
                self.engine.runner.follow()
        except Exception:  # rank 0 is gone, or this rank's step failed: the gang restarts
            end_gang(f"rank {self.tp.rank} stopped following rank 0")

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _landed(self, p: int, inc: Incoming, msg: TransferDone) -> None:
        if self._receivers[p].close(inc):
            error = "" if inc.complete else f"rank {self.tp.rank}: incomplete transfer"
            self._leader().rank_landed.remote(
                inc.attempt_id, self.tp.rank, p, error, inc.bytes_landed
            )

    def _cancelled(self, p: int, inc: Incoming) -> None:
        self._receivers[p].close(inc)  # rank 0 hears the cancel on its own channel

    def _failed(self, p: int, inc: Incoming, reason: str) -> None:
        if self._receivers[p].close(inc):
            self._leader().rank_landed.remote(inc.attempt_id, self.tp.rank, p, reason, 0)
