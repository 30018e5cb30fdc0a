"""The Ray actor shell of a decode worker's rank other than 0 (see `rank_service.py`).

Like the rank 0 shell it imports neither torch nor the engine at module level.
"""

from __future__ import annotations

import ray

from pdserve.api.messages import ChannelAddress, RankStatus
from pdserve.api.naming import NAMESPACE, actor_name
from pdserve.decode_worker.actor import SWITCH_INTERVAL_S
from pdserve.engine import gang
from pdserve.engine.config import EngineConfig


class DecodeRank:
    def __init__(
        self,
        worker_id: str,
        rank: int,
        size: int,
        engine_config: EngineConfig,
        transfer_timeout_s: float,
        threads: int,
        cluster_secret: bytes,
    ) -> None:
        import sys

        import torch

        from pdserve.decode_worker.rank_service import DecodeRankService
        from pdserve.engine.parallel import TPGroup

        torch.set_num_threads(threads)
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._worker_id = worker_id
        self._leader = None
        self._svc = DecodeRankService(
            TPGroup(rank, size),
            engine_config,
            ray.util.get_node_ip_address(),
            cluster_secret,
            ray.get_runtime_context().get_node_id(),
            transfer_timeout_s,
            self._leader_handle,
        )

    def _leader_handle(self):
        if self._leader is None:
            self._leader = ray.get_actor(actor_name(self._worker_id), namespace=NAMESPACE)
        return self._leader

    async def hold(self) -> None:
        await gang.hold()

    async def join(self, host: str, port: int) -> None:
        await self._svc.join(host, port)

    async def open_channel(
        self, prefill_id: str, sources: list[tuple[int, slice]]
    ) -> list[tuple[int, ChannelAddress]]:
        return self._svc.open_channel(prefill_id, sources)

    async def expect(
        self,
        attempt_id: str,
        prefill_id: str,
        parts: list[tuple[int, int]],
        block_ids: list[int],
        num_tokens: int,
        held: int,
        transfer_id: int,
    ) -> bool:
        return self._svc.expect(
            attempt_id, prefill_id, parts, block_ids, num_tokens, held, transfer_id
        )

    async def close(self, attempt_id: str) -> None:
        self._svc.close(attempt_id)

    async def status(self) -> RankStatus:
        return self._svc.status()
