"""The Ray actor shell of a decode worker rank (rank 0 of its tensor-parallel gang).

Like the prefill shell, it imports neither torch nor the engine at module level.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import ray

from pdserve.api.messages import (
    ChannelAddress,
    PrefillRequest,
    ReserveReply,
    StepOutputs,
    WorkerStatus,
)
from pdserve.engine.config import EngineConfig


class DecodeWorker:
    def __init__(
        self, worker_id: str, engine_config: EngineConfig, transfer_timeout_s: float, threads: int
    ) -> None:
        from pdserve.decode_worker.service import DecodeService

        host = ray.util.get_node_ip_address()
        self._svc = DecodeService(worker_id, engine_config, host, transfer_timeout_s, threads)

    async def start(self) -> int:
        """Starts the step loop; returns the longest sequence this worker accepts."""
        await self._svc.start()
        return self._svc.engine.max_model_len

    async def open_channel(self, prefill_id: str) -> ChannelAddress:
        return await self._svc.open_channel(prefill_id)

    async def reserve(self, req: PrefillRequest, prefill_id: str, epoch: int) -> ReserveReply:
        return await self._svc.reserve(req, prefill_id, epoch)

    async def abort(self, request_id: str) -> bool:
        return await self._svc.abort(request_id)

    async def prefill_locally(self, req: PrefillRequest) -> bool:
        return await self._svc.prefill_locally(req)

    async def status(self) -> WorkerStatus:
        return await self._svc.status()

    async def stream(self) -> AsyncIterator[StepOutputs]:
        async for outputs in self._svc.stream():
            yield outputs
