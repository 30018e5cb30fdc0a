"""The Ray actor shell of a prefill worker's rank other than 0 (see `rank_service.py`).

Like the rank 0 shell it imports neither torch nor the engine at module level.
"""

from __future__ import annotations

import ray

from pdserve.api.messages import RankStatus
from pdserve.engine import gang
from pdserve.engine.config import EngineConfig


class PrefillRank:
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
        import torch

        from pdserve.engine.parallel import TPGroup
        from pdserve.prefill_worker.rank_service import PrefillRankService

        torch.set_num_threads(threads)
        self._svc = PrefillRankService(
            TPGroup(rank, size),
            engine_config,
            ray.util.get_node_ip_address(),
            cluster_secret,
            ray.get_runtime_context().get_node_id(),
            transfer_timeout_s,
        )

    async def hold(self) -> None:
        await gang.hold()

    async def join(self, host: str, port: int) -> None:
        await self._svc.join(host, port)

    async def join_channels(self, decode_id: str, epoch: int, links: list) -> None:
        await self._svc.join_channels(decode_id, epoch, links)

    async def status(self) -> RankStatus:
        return self._svc.status()
