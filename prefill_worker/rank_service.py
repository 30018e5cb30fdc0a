"""A rank other than 0 of a tensor-parallel prefill worker.

It runs its shard of every step that rank 0 broadcasts and carries out rank 0's KV transfer
orders (`kv_transfer/orders.py`) with its own KV heads on its own channels, so that each decode
rank receives its heads from the prefill rank that holds them. Orders and steps arrive on one
thread, in the order rank 0 made them; channels are joined on the actor's event loop (when rank
0 opens its own) and used only by that thread after.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import torch

from pdserve.api.errors import TransferFailed
from pdserve.api.messages import ChannelAddress, RankStatus
from pdserve.engine.config import EngineConfig
from pdserve.engine.gang import end_gang
from pdserve.engine.kv_transfer.channel import KVChannel
from pdserve.engine.kv_transfer.links import Links
from pdserve.engine.kv_transfer.messages import KVChunk, Message
from pdserve.engine.kv_transfer.orders import (
    CloseChannels,
    Drop,
    Flush,
    Gather,
    Relay,
    SendChunk,
    decode_orders,
)
from pdserve.engine.kv_transfer.routes import Route
from pdserve.engine.kv_transfer.slots import gather_tokens
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.parallel import TPGroup

logger = logging.getLogger(__name__)


class PrefillRankService:
    """KV channels listen on `host` (the node's cluster address) and prove the cluster's
    `secret`."""

    def __init__(
        self,
        tp: TPGroup,
        config: EngineConfig,
        host: str,
        secret: bytes,
        node: str,
        transfer_timeout_s: float,
    ) -> None:
        self.tp = tp
        self.engine = LLMEngine(config, tp)
        self._host, self._secret, self._node = host, secret, node
        self._timeout_s = transfer_timeout_s
        self._block_size = config.block_size
        self._channels: dict[tuple[str, int], Links] = {}  # by (decode worker, rank 0's epoch)
        self._channels_lock = threading.Lock()
        self._staged: dict[tuple[str, int, int], torch.Tensor] = {}  # (attempt, layer, start)
        self._closed_bytes = 0

    async def join(self, host: str, port: int) -> None:
        """Joins the worker's group (rank 0 hosts it) and starts following its steps."""
        await asyncio.to_thread(self.tp.join, host, port, self.engine.device, self._timeout_s)
        threading.Thread(target=self._follow, daemon=True, name="tp-follow").start()

    async def join_channels(
        self, decode_id: str, epoch: int, links: list[tuple[Route, ChannelAddress]]
    ) -> None:
        device, timeout = self.engine.device, self._timeout_s
        kvs = await asyncio.gather(
            *(
                asyncio.to_thread(
                    KVChannel.connect, a.host, a.port, self._host, device, timeout, self._secret
                )
                for _, a in links
            )
        )
        with self._channels_lock:
            self._channels[decode_id, epoch] = Links([(r, kv) for (r, _), kv in zip(links, kvs)])

    def status(self) -> RankStatus:
        with self._channels_lock:
            sent = self._closed_bytes + sum(c.bytes_sent for c in self._channels.values())
        return RankStatus(
            self.tp.rank, self._node, self.engine.weight_bytes, self.engine.kv_cache_bytes, sent
        )

    def _follow(self) -> None:
        try:
            while True:
                self.engine.runner.follow(self._carry_out)
        except Exception:  # rank 0 is gone, or this rank's step failed: the gang restarts
            end_gang(f"rank {self.tp.rank} stopped following rank 0")

    def _carry_out(self, data: bytes) -> None:
        for order in decode_orders(data):
            if isinstance(order, Gather):
                slots = torch.tensor(order.slots, dtype=torch.long, device=self.engine.device)
                bs = self._block_size
                payload = gather_tokens(
                    self.engine.kv_cache, order.layer, (slots // bs, slots % bs)
                )
                self._staged[order.attempt_id, order.layer, order.token_start] = payload
            elif isinstance(order, SendChunk):
                payload = self._staged.pop((order.attempt_id, order.layer, order.gather_start))
                skip = order.token_start - order.gather_start
                chunk = KVChunk(
                    order.transfer_id,
                    order.layer,
                    order.token_start,
                    payload[skip : skip + order.n],
                )
                self._on_channels(order.decode_id, order.epoch, chunk)
            elif isinstance(order, Relay):
                self._on_channels(order.decode_id, order.epoch, order.message)
            elif isinstance(order, Flush):
                self._on_channels(order.decode_id, order.epoch, None)
            elif isinstance(order, Drop):
                for key in [k for k in self._staged if k[0] == order.attempt_id]:
                    del self._staged[key]
            elif isinstance(order, CloseChannels):
                with self._channels_lock:
                    links = self._channels.pop((order.decode_id, order.epoch), None)
                    if links is not None:
                        self._closed_bytes += links.bytes_sent
                if links is not None:
                    links.close()

    def _on_channels(self, decode_id: str, epoch: int, message: Message | None) -> None:
        """Sends `message` on this rank's channels to the decode worker (None: waits for what
        was sent). A failure only closes them: the decode ranks see it and fail the transfer,
        and rank 0 rebuilds the channels for later requests."""
        links = self._channels.get((decode_id, epoch))
        if links is None or links.broken:
            return
        try:
            if message is None:
                links.flush()
            else:
                links.send(message)
        except TransferFailed as e:
            logger.warning("KV channel to %s failed: %s", decode_id, e)
            links.close()
