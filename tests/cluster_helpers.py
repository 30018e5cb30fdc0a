"""Helpers for tests that talk to a running cluster's workers."""

from __future__ import annotations

import time

LAYERS, KV_HEADS, HEAD_DIM, DTYPE_BYTES = 4, 2, 64, 4  # the default tiny llama in float32


def worker_status(cluster, worker_id: str):
    import ray

    return ray.get(cluster.workers.all()[worker_id].status.remote())


def wait_until_idle(cluster, timeout: float = 10.0) -> dict:
    """Polls until every worker has no request and every KV block is free; returns statuses."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = {w: worker_status(cluster, w) for w in cluster.workers.all()}
        idle = all(
            s.running == 0 and s.waiting == 0 and s.free_blocks == s.total_blocks
            for s in statuses.values()
        )
        if idle or time.monotonic() > deadline:
            return statuses
        time.sleep(0.05)


def kv_bytes(num_tokens: int) -> int:
    return LAYERS * 2 * KV_HEADS * HEAD_DIM * num_tokens * DTYPE_BYTES
