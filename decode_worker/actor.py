"""The Ray actor shell of a decode worker: its rank 0, which creates its other tensor-parallel
ranks (`rank.py`) and fails with them as one gang (`engine/gang.py`).

Like the prefill shell, it imports neither torch nor the engine at module level, and it owns the
process-wide settings (torch threads, the GIL switch interval) that the service must not touch.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import ray

from pdserve.api.messages import (
    ChannelAddress,
    LinkAddress,
    PrefillRequest,
    ReserveReply,
    WorkerStatus,
)
from pdserve.engine.config import EngineConfig
from pdserve.engine.gang import Gang, GangSpec

# NOTE: the KV receiver threads (and Ray's RPC threads) need the GIL back after every blocking
# call while the step loop holds it; at Python's default 5 ms switch interval each message of a
# transfer could wait that long. Measured with `pdserve bench` at 8 req/s: TTFT p50 221 -> 188
# ms, TPOT p50 16.3 -> 9.7 ms. (The prefill worker, whose step is the long one, is better off
# with the default.)
SWITCH_INTERVAL_S = 0.0002


class DecodeWorker:
    """Rank 0 of a decode worker; `gang` says where its other ranks run."""

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

        from pdserve.decode_worker.rank import DecodeRank
        from pdserve.decode_worker.service import DecodeService

        # NOTE: the other ranks are created before this one loads the model, so that they load
        # theirs meanwhile (a gang loads again after every restart).
        args = (engine_config, transfer_timeout_s, threads, cluster_secret)
        self._gang = Gang(worker_id, gang, DecodeRank, *args)
        torch.set_num_threads(threads)
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._svc = DecodeService(
            worker_id,
            engine_config,
            ray.util.get_node_ip_address(),
            cluster_secret,
            transfer_timeout_s,
            self._gang.ranks,
            ray.get_runtime_context().get_node_id(),
        )
        self._started = False

    async def start(self) -> int:
        """Leads the gang and starts the step loop (once per process: after a restart, the
        router's supervisor calls it again); returns the longest sequence this worker
        accepts."""
        if not self._started:
            self._started = True
            await self._gang.start(self._svc.start)
        return self._svc.engine.max_model_len

    async def open_channel(
        self, prefill_id: str, prefill_tp: int
    ) -> tuple[tuple[int, int, ChannelAddress], ...]:
        return await self._svc.open_channel(prefill_id, prefill_tp)

    async def rank_landed(
        self, attempt_id: str, rank: int, source: int, error: str, nbytes: int
    ) -> None:
        await self._svc.rank_landed(attempt_id, rank, source, error, nbytes)

    async def reserve(self, req: PrefillRequest, prefill_id: str, epoch: int) -> ReserveReply:
        return await self._svc.reserve(req, prefill_id, epoch)

    async def abort(self, attempt_id: str) -> bool:
        return await self._svc.abort(attempt_id)

    async def prefill_locally(self, req: PrefillRequest) -> bool:
        return await self._svc.prefill_locally(req)

    async def status(self) -> WorkerStatus:
        return await self._svc.status()

    async def kv_snapshot(self) -> bytes:
        return await self._svc.kv_snapshot()

    async def kv_events(self) -> AsyncIterator[bytes]:
        async for batch in self._svc.kv_events():
            yield batch

    async def token_link(self) -> LinkAddress:
        return await self._svc.token_link()

    async def inject_stall(self, seconds: float) -> None:
        await self._svc.inject_stall(seconds)
