"""`GetClusterStatus`: every worker's own account of its load, asked in parallel."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from pdserve.api.messages import WorkerStatus
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.registry import UP, describe

if TYPE_CHECKING:
    from pdserve.router.router import Router

STATUS_TIMEOUT_S = 5.0


async def cluster_status(router: Router) -> pb.ClusterStatus:
    """Serving means what the health service says: a decode worker is up (it prefills locally
    when no prefill worker is). Each worker has its state (up, restarting, dead); those up are
    asked for their load, and one that does not answer says why in `error`."""
    workers = list(router.registry.workers.values())
    up = [w for w in workers if w.state == UP]
    answers = await asyncio.gather(*(_ask(w.handle) for w in up), return_exceptions=True)
    answered = dict(zip((w.worker_id for w in up), answers))
    infos = []
    for worker in workers:
        answer = answered.get(worker.worker_id)
        if answer is None or isinstance(answer, BaseException):
            error = worker.reason
            if isinstance(answer, BaseException):
                router.registry.call_failed(worker.worker_id, answer)
                error = f"no status: {describe(answer)}"
            info = pb.WorkerInfo(id=worker.worker_id, role=worker.role, error=error)
        else:
            info = _info(answer, worker.worker_id, worker.role)
        info.state = worker.state
        infos.append(info)
    return pb.ClusterStatus(
        model=router.model_name,
        serving=router.registry.serving,
        workers=infos,
        inflight=router.num_inflight,
        vocab_size=router.vocab_size,
        max_model_len=router.max_model_len,
    )


async def _ask(handle: Any) -> WorkerStatus:
    return await asyncio.wait_for(handle.status.remote(), STATUS_TIMEOUT_S)


def _info(status: WorkerStatus, worker_id: str, role: str) -> pb.WorkerInfo:
    return pb.WorkerInfo(
        id=worker_id,
        role=role,
        tp=status.tp,
        running=status.running,
        waiting=status.waiting,
        free_blocks=status.free_blocks,
        total_blocks=status.total_blocks,
        cached_blocks=status.cached_blocks,
        requests_total=status.requests_total,
        prompt_tokens_computed=status.prompt_tokens_computed,
        prompt_tokens_cached=status.prompt_tokens_cached,
        kv_blocks_received=status.kv_blocks_received,
        kv_blocks_sent=status.kv_blocks_sent,
    )
