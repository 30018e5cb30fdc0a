"""The Ray actor shell of a prefill worker.

This module imports neither torch nor the engine, so the router process can create actors
from it and stay torch-free; the service (and torch) load inside the actor's own process.
"""

from __future__ import annotations

import ray

from pdserve.api.messages import PrefillRequest, PrefillResult, WorkerStatus
from pdserve.api.naming import NAMESPACE, actor_name


class PrefillWorker:
    def __init__(self, worker_id: str, engine_config, transfer_timeout_s: float, threads: int):
        import torch

        from pdserve.prefill_worker.service import PrefillService

        torch.set_num_threads(threads)
        self._handles: dict[str, object] = {}
        self._svc = PrefillService(worker_id, engine_config, transfer_timeout_s, self._decode)

    def _decode(self, worker_id: str):
        handle = self._handles.get(worker_id)
        if handle is None:
            handle = ray.get_actor(actor_name(worker_id), namespace=NAMESPACE)
            self._handles[worker_id] = handle
        return handle

    async def start(self) -> str:
        await self._svc.start()
        return self._svc.worker_id

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        return await self._svc.prefill(req)

    async def abort(self, request_id: str) -> bool:
        return await self._svc.abort(request_id)

    async def status(self) -> WorkerStatus:
        return await self._svc.status()

    async def inject_fault(self, decode_id: str, after_messages: int) -> None:
        self._svc.inject_fault(decode_id, after_messages)
