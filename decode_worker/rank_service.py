"""A rank other than 0 of a tensor-parallel decode worker.

It runs its shard of every step that rank 0 broadcasts (on a thread of its own, blocked in
the broadcast between steps), and receives exactly its KV heads from prefill workers on
channels of its own. Rank 0 decides everything about a request: this rank registers the
transfers rank 0 tells it of (`expect`, with rank 0's block ids: every rank's pool mirrors rank
0's, since only rank 0 allocates), and tells rank 0 when its part has landed or failed. The
receiver's callbacks and every RPC run on the actor's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from pdserve.api.messages import ChannelAddress, RankStatus
from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_transfer.messages import TransferDone
from pdserve.engine.kv_transfer.receiver import Incoming, KVReceiver
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.parallel import TPGroup

logger = logging.getLogger(__name__)


class DecodeRankService:
    """`leader()` returns the Ray handle of rank 0."""

    def __init__(
        self,
        tp: TPGroup,
        config: EngineConfig,
        host: str,
        node: str,
        transfer_timeout_s: float,
        leader: Callable[[], Any],
    ) -> None:
        self.tp = tp
        self.engine = LLMEngine(config, tp)
        self._node = node
        self._timeout_s = transfer_timeout_s
        self._leader = leader
        self._loop: asyncio.AbstractEventLoop | None = None
        self._receiver = KVReceiver(
            host,
            self.engine.kv_cache,
            config.block_size,
            transfer_timeout_s,
            post=self._post,
            on_done=self._landed,
            on_cancel=self._receiver_close,
            on_failed=self._failed,
        )

    async def join(self, host: str, port: int) -> None:
        """Joins the worker's group (rank 0 hosts it) and starts following its steps."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self.tp.join, host, port, self.engine.device, self._timeout_s)
        threading.Thread(target=self._follow, daemon=True, name="tp-follow").start()

    def open_channel(self, prefill_id: str) -> ChannelAddress:
        return self._receiver.open_channel(prefill_id)

    def expect(
        self,
        attempt_id: str,
        prefill_id: str,
        epoch: int,
        block_ids: list[int],
        num_tokens: int,
        held: int,
        transfer_id: int,
    ) -> bool:
        """Registers this rank's part of a transfer; False when its channel from that prefill
        worker is not the live one of `epoch` (rank 0 then has the channels rebuilt)."""
        if not self._receiver.channel_ok(prefill_id, epoch):
            return False
        self._receiver.expect(attempt_id, prefill_id, block_ids, num_tokens, held, transfer_id)
        return True

    def close(self, attempt_id: str) -> None:
        """Rank 0 gave the request's blocks up (abort, fallback): no more writes into them."""
        inc = self._receiver.get(attempt_id)
        if inc is not None:
            self._receiver.close(inc)

    def status(self) -> RankStatus:
        return RankStatus(
            self.tp.rank,
            self._node,
            self.engine.weight_bytes,
            self.engine.kv_cache_bytes,
            self._receiver.bytes_received,
        )

    def _follow(self) -> None:
        try:
            while True:
                self.engine.runner.follow()
        except Exception:  # rank 0 is gone; the worker is being torn down
            logger.exception("rank %d stopped following rank 0", self.tp.rank)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _landed(self, inc: Incoming, msg: TransferDone) -> None:
        if self._receiver.close(inc):
            error = "" if inc.complete else f"rank {self.tp.rank}: incomplete transfer"
            self._leader().rank_landed.remote(inc.attempt_id, self.tp.rank, error)

    def _receiver_close(self, inc: Incoming) -> None:
        self._receiver.close(inc)  # rank 0 hears the cancel on its own channel

    def _failed(self, inc: Incoming, reason: str) -> None:
        if self._receiver.close(inc):
            self._leader().rank_landed.remote(inc.attempt_id, self.tp.rank, reason)
