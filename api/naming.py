"""How workers are named in Ray, so any part can find a worker by its id."""

from __future__ import annotations

NAMESPACE = "pdserve"


def actor_name(worker_id: str) -> str:
    return f"pdserve-{worker_id}"
