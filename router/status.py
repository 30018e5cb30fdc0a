"""`GetClusterStatus`: every worker's own account of its load, asked in parallel."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from pdserve.api.messages import WorkerStatus
from pdserve.proto import pdserve_pb2 as pb

if TYPE_CHECKING:
    from pdserve.router.router import Router

STATUS_TIMEOUT_S = 5.0


async def cluster_status(router: Router) -> pb.ClusterStatus:
    """Serving means: at least one worker of each role, and every worker answered."""
    workers = [("prefill", w, h) for w, h in router.prefill_workers.items()]
    workers += [("decode", w, h) for w, h in router.decode_workers.items()]
    answers = await asyncio.gather(*(_ask(h) for _, _, h in workers), return_exceptions=True)
    infos = []
    for (role, worker_id, _), answer in zip(workers, answers):
        error = router.lost_workers.get(worker_id, "")
        if isinstance(answer, BaseException):
            error = error or f"{type(answer).__name__}: {answer}"
            infos.append(pb.WorkerInfo(id=worker_id, role=role, error=error))
        else:
            infos.append(_info(answer, worker_id, role, error))
    return pb.ClusterStatus(
        model=router.model_name,
        serving=bool(router.prefill_workers)
        and bool(router.decode_workers)
        and not any(info.error for info in infos),
        workers=infos,
        inflight=router.num_inflight,
        queued=router.num_queued,
        vocab_size=router.vocab_size,
        max_model_len=router.max_model_len,
    )


async def _ask(handle: Any) -> WorkerStatus:
    return await asyncio.wait_for(handle.status.remote(), STATUS_TIMEOUT_S)


def _info(status: WorkerStatus, worker_id: str, role: str, error: str) -> pb.WorkerInfo:
    return pb.WorkerInfo(
        id=worker_id,
        role=role,
        tp=status.tp,
        running=status.running,
        waiting=status.waiting,
        free_blocks=status.free_blocks,
        total_blocks=status.total_blocks,
        cached_blocks=status.cached_blocks,
        error=error,
        requests_total=status.requests_total,
        prompt_tokens_computed=status.prompt_tokens_computed,
        prompt_tokens_cached=status.prompt_tokens_cached,
        kv_blocks_received=status.kv_blocks_received,
        kv_blocks_sent=status.kv_blocks_sent,
    )
