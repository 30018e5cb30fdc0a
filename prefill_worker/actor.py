"""The Ray actor shell of a prefill worker: its rank 0, which creates its other tensor-parallel
ranks (`rank.py`) and fails with them as one gang (`engine/gang.py`).

This module imports neither torch nor the engine, so the router process can create actors
from it and stay torch-free; the service (and torch) load inside the actor's own process,
where this shell sets the process-wide torch thread count.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import ray
from ray.actor import ActorHandle

from pdserve.api.messages import PrefillRequest, PrefillResult, WorkerStatus
from pdserve.api.naming import NAMESPACE, actor_name
from pdserve.engine.config import EngineConfig
from pdserve.engine.gang import Gang, GangSpec


class PrefillWorker:
    """Rank 0 of a prefill worker; `gang` says where its other ranks run."""

    def __init__(
        self,
        worker_id: str,
        engine_config: EngineConfig,
        transfer_timeout_s: float,
        threads: int,
        cluster_secret: bytes,
        gang: GangSpec,
    ) -> None:
        import torch

        from pdserve.prefill_worker.rank import PrefillRank
        from pdserve.prefill_worker.service import PrefillService

        # NOTE: the other ranks are created before this one loads the model, so that they load
        # theirs meanwhile (a gang loads again after every restart).
        args = (engine_config, transfer_timeout_s, threads, cluster_secret)
        self._gang = Gang(worker_id, gang, PrefillRank, *args)
        torch.set_num_threads(threads)
        self._handles: dict[str, ActorHandle] = {}
        self._svc = PrefillService(
            worker_id,
            engine_config,
            ray.util.get_node_ip_address(),
            cluster_secret,
            transfer_timeout_s,
            self._decode,
            ray.get_runtime_context().get_node_id(),
            self._gang.ranks,
        )
        self._started = False

    def _decode(self, worker_id: str) -> ActorHandle:
        handle = self._handles.get(worker_id)
        if handle is None:
            handle = ray.get_actor(actor_name(worker_id), namespace=NAMESPACE)
            self._handles[worker_id] = handle
        return handle

    async def start(self) -> int:
        """Leads the gang and starts the step loop (once per process: after a restart, the
        router's supervisor calls it again); returns the longest sequence this worker
        accepts."""
        if not self._started:
            self._started = True
            await self._gang.start(self._svc.start)
        return self._svc.engine.max_model_len

    async def connect(self, decode_ids: list[str]) -> None:
        await self._svc.connect(decode_ids)

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        return await self._svc.prefill(req)

    async def abort(self, attempt_id: str) -> bool:
        return await self._svc.abort(attempt_id)

    async def status(self) -> WorkerStatus:
        return await self._svc.status()

    async def kv_snapshot(self) -> bytes:
        return await self._svc.kv_snapshot()

    async def kv_events(self) -> AsyncIterator[bytes]:
        async for batch in self._svc.kv_events():
            yield batch

    async def inject_stall(self, seconds: float) -> None:
        await self._svc.inject_stall(seconds)

    async def inject_fault(
        self, decode_id: str, after_messages: int | None, stall: bool = False
    ) -> None:
        await self._svc.inject_fault(decode_id, after_messages, stall)
