"""Every worker's own account of its load, asked in parallel: for `GetClusterStatus` and for
the per-worker figures of `/metrics`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pdserve.api.messages import WorkerStatus
from pdserve.proto import pdserve_pb2 as pb

if TYPE_CHECKING:
    from pdserve.router.router import Router

STATUS_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class WorkerAnswer:
    """One worker's status, or why it has none (`error`, empty when it answered)."""

    worker_id: str
    role: str
    status: WorkerStatus | None
    error: str = ""


async def ask_workers(router: Router) -> list[WorkerAnswer]:
    workers = [("prefill", w, h) for w, h in router.prefill_workers.items()]
    workers += [("decode", w, h) for w, h in router.decode_workers.items()]
    answers = await asyncio.gather(*(_ask(h) for _, _, h in workers), return_exceptions=True)
    out = []
    for (role, worker_id, _), answer in zip(workers, answers):
        error = router.lost_workers.get(worker_id, "")
        if isinstance(answer, BaseException):
            error = error or f"{type(answer).__name__}: {answer}"
            out.append(WorkerAnswer(worker_id, role, None, error))
        else:
            out.append(WorkerAnswer(worker_id, role, answer, error))
    return out


async def cluster_status(router: Router) -> pb.ClusterStatus:
    """Serving means: at least one worker of each role, and every worker answered."""
    infos = [_info(answer) for answer in await ask_workers(router)]
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


def _info(answer: WorkerAnswer) -> pb.WorkerInfo:
    status = answer.status
    info = pb.WorkerInfo(id=answer.worker_id, role=answer.role, error=answer.error)
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
    return info
