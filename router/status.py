"""Every worker's own account of its load, asked in parallel: for `GetClusterStatus` and for
the per-worker figures of `/metrics`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdserve.api.messages import WorkerStatus
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.registry import UP, describe

if TYPE_CHECKING:
    from pdserve.router.router import Router

STATUS_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class WorkerAnswer:
    """One worker's state (up, restarting, dead) and status, or why it has none (`error`,
    empty when it answered)."""

    worker_id: str
    role: str
    state: str
    status: WorkerStatus | None
    error: str = ""


async def ask_workers(router: Router) -> list[WorkerAnswer]:
    """Every worker, with the status of those up (asked in parallel). One that does not
    answer says why, and a dead process behind it is reported to the registry."""
    workers = list(router.registry.workers.values())
    up = [w for w in workers if w.state == UP]
    answers = await asyncio.gather(*(_ask(w.handle) for w in up), return_exceptions=True)
    answered = dict(zip((w.worker_id for w in up), answers))
    out = []
    for worker in workers:
        answer = answered.get(worker.worker_id)
        if isinstance(answer, BaseException):
            router.registry.call_failed(worker.worker_id, answer)
            error = f"no status: {describe(answer)}"
            out.append(WorkerAnswer(worker.worker_id, worker.role, worker.state, None, error))
        else:
            out.append(
                WorkerAnswer(worker.worker_id, worker.role, worker.state, answer, worker.reason)
            )
    return out


async def cluster_status(router: Router) -> pb.ClusterStatus:
    """Serving means what the health service says: a decode worker is up (it prefills locally
    when no prefill worker is)."""
    infos = [_info(answer) for answer in await ask_workers(router)]
    return pb.ClusterStatus(
        model=router.model_name,
        serving=router.registry.serving,
        workers=infos,
        inflight=router.num_inflight,
        queued=router.num_queued,
        vocab_size=router.vocab_size,
        max_model_len=router.max_model_len,
    )


async def _ask(handle: Any) -> WorkerStatus:
    return await asyncio.wait_for(handle.status.remote(), STATUS_TIMEOUT_S)


def _info(answer: WorkerAnswer) -> pb.WorkerInfo:
    status = answer.status
    info = pb.WorkerInfo(
        id=answer.worker_id, role=answer.role, state=answer.state, error=answer.error
    )
    if status is None:
        return info
    info.tp = status.tp
    info.running = status.running
    info.waiting = status.waiting
    info.free_blocks = status.free_blocks
    info.total_blocks = status.total_blocks
    info.cached_blocks = status.cached_blocks
    info.requests_total = status.requests_total
    info.prompt_tokens_computed = status.prompt_tokens_computed
    info.prompt_tokens_cached = status.prompt_tokens_cached
    info.kv_blocks_received = status.kv_blocks_received
    info.kv_blocks_sent = status.kv_blocks_sent
    info.ranks.extend(
        pb.RankInfo(
            rank=r.rank,
            node=r.node,
            weight_bytes=r.weight_bytes,
            kv_cache_bytes=r.kv_cache_bytes,
            kv_bytes=r.kv_bytes,
        )
        for r in status.ranks
    )
    return info
