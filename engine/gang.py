"""A tensor-parallel worker's ranks as Ray actors (a gang), and its one unit of failure.

Rank 0 is the worker's actor: the launcher creates it, the router talks to it, and Ray restarts
it (the supervision's `max_restarts`). Rank 0 creates the other ranks itself, each in its bundle
of the worker's placement group, with no restarts of their own; Ray kills the actors that a
process created when that process dies. So the gang fails whole:

- rank 0 dies: its ranks die with it; Ray restarts rank 0, whose new process creates fresh
  ranks and leads them into a new group (`parallel.lead`), and the router's supervisor
  re-registers the worker in a new epoch, as it does a TP 1 worker;
- another rank dies, or any rank's step fails: rank 0 hears it at once through the call it
  holds open on every rank (`hold`), or from its failed collective, and ends its own process
  (`end_gang`), which is the first case.

No survivor waits for ever in a collective whose peer is gone: it is killed. Every failure of
the gang costs rank 0 one restart, so `max_restarts` bounds a gang as it bounds one rank.

This module imports neither torch nor the engine: the actor shells import it at module level.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import ray
from ray.actor import ActorHandle
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GangSpec:
    """Where a worker's `size` ranks run: rank i in bundle i of `group`, each taking one unit
    of `resource` (the worker's role, which node types advertise) and `gpus` GPUs.

    NOTE: ranks ask num_cpus=0: actors asking for more CPUs than exist stay pending for ever."""

    size: int
    group: PlacementGroup
    resource: str
    gpus: int

    def options(self, rank: int, max_restarts: int = 0) -> dict[str, Any]:
        """The Ray actor options of rank `rank`."""
        strategy = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=rank)
        return dict(
            num_cpus=0,
            num_gpus=self.gpus,
            resources={self.resource: 1},
            scheduling_strategy=strategy,
            max_restarts=max_restarts,
        )


class Gang:
    """Rank 0's side of the gang: creates ranks 1..size-1 from `rank_cls` (whose constructor
    takes `(worker_id, rank, size, *args)` and which has an async `hold` that never returns),
    and watches them once started."""

    def __init__(self, worker_id: str, spec: GangSpec, rank_cls: type, *args: Any) -> None:
        self.worker_id = worker_id
        remote = ray.remote(rank_cls)
        self.ranks: list[ActorHandle] = [
            remote.options(**spec.options(r)).remote(worker_id, r, spec.size, *args)
            for r in range(1, spec.size)
        ]
        self._watch: asyncio.Task[None] | None = None

    async def start(self, start: Callable[[], Awaitable[None]]) -> None:
        """Runs rank 0's `start` (which leads the ranks into the worker's group), watching the
        ranks from before it: the process ends when a rank dies or the gang cannot form."""
        if not self.ranks:
            await start()
            return
        self._watch = asyncio.create_task(self._watch_ranks(), name=f"gang-{self.worker_id}")
        try:
            await start()
        except Exception:
            end_gang(f"worker {self.worker_id}: the gang did not form")

    async def _watch_ranks(self) -> None:
        async def held(rank: int, handle: ActorHandle) -> int:
            try:
                await handle.hold.remote()
            except Exception as e:  # the rank's process is gone (or unreachable)
                logger.error("worker %s: rank %d: %s", self.worker_id, rank, e)
            return rank

        holds = [asyncio.ensure_future(held(r, h)) for r, h in enumerate(self.ranks, 1)]
        done, _ = await asyncio.wait(holds, return_when=asyncio.FIRST_COMPLETED)
        end_gang(f"worker {self.worker_id}: rank {next(iter(done)).result()} died")


async def hold() -> None:
    """A rank's side of rank 0's watch: never returns, so the call fails only when the rank's
    process dies."""
    await asyncio.Event().wait()


def end_gang(reason: str) -> NoReturn:
    """Ends this rank's process, and with it the gang (see the module's docstring); called in
    an `except` block, it logs the exception too.

    NOTE: `os._exit`, not an exception or `ray.actor.exit_actor`: Ray restarts only an actor
    whose process died unexpectedly, and a thread blocked in a collective must not keep the
    process alive."""
    logger.error(
        "%s; the tensor-parallel gang restarts whole",
        reason,
        exc_info=sys.exc_info()[0] is not None,
    )
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(1)
