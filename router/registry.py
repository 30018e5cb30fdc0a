"""The router's account of its workers: which are up, restarting or dead.

Workers are Ray actors that Ray restarts (the launcher's `max_restarts`) in a new process under
the same handle (for a TP > 1 worker, its rank 0, whose new process brings a new gang of the
other ranks: `engine/gang.py`). Whatever notices a failure (a worker's token or KV event stream
ending, a call raising) reports it here; the worker then leaves placement at once (`on_down`)
and a recovery task calls its `start` with growing pauses (`backoff_s` doubling up to
`max_backoff_s`). A call to a restarting actor waits for the new process, so the first `start`
that answers re-registers the worker in a new epoch (`on_up`: streams and KV events are
consumed anew, the index is rebuilt from a snapshot). Calls that keep failing with
`ActorDiedError` mean Ray has given the worker up (its restarts are spent): it is dead for good.

Reasons kept here reach clients (status, errors), so they name what happened, never Ray's
internals (actor ids, pids, addresses).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorDiedError, RayActorError

logger = logging.getLogger(__name__)

UP, RESTARTING, DEAD = "up", "restarting", "dead"
# A restarting actor answers a call once its new process is up, a dead one at once with
# ActorDiedError; this many such answers in a row (with backoff between) mean dead.
DIED_ANSWERS_FOR_DEAD = 3
START_TIMEOUT_S = 300.0  # a restart loads the model again


@dataclass
class Worker:
    """`epoch` counts the worker's registrations: 0 at start, +1 each time it comes back."""

    worker_id: str
    role: str
    handle: Any
    state: str = UP
    epoch: int = 0
    reason: str = ""  # why it is not up


def describe(error: BaseException | str) -> str:
    """A client-safe account of a worker's failure."""
    if isinstance(error, str):
        return error
    if isinstance(error, RayActorError):
        return "its process died" if isinstance(error, ActorDiedError) else "it is unreachable"
    return type(error).__name__


class WorkerRegistry:
    """`on_down(worker)` runs when an up worker fails, `on_up(worker)` when it is back (both on
    the event loop, synchronously, before any other request sees the new state)."""

    def __init__(
        self,
        prefill: Mapping[str, Any],
        decode: Mapping[str, Any],
        *,
        on_down: Callable[[Worker], None],
        on_up: Callable[[Worker], None],
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.workers = {w: Worker(w, "prefill", h) for w, h in prefill.items()}
        self.workers.update({w: Worker(w, "decode", h) for w, h in decode.items()})
        self._on_down, self._on_up = on_down, on_up
        self._backoff_s, self._max_backoff_s = backoff_s, max_backoff_s
        self._recovering: dict[str, asyncio.Task[None]] = {}
        self._changed = asyncio.Event()  # set (and replaced) at every change of state

    def up(self, role: str) -> list[str]:
        return [w.worker_id for w in self.workers.values() if w.role == role and w.state == UP]

    @property
    def serving(self) -> bool:
        """A decode worker is up. It can prefill locally, so it is a prefill path of its own
        when no prefill worker is up."""
        return bool(self.up("decode"))

    def report_failure(
        self, worker_id: str, error: BaseException | str, epoch: int | None = None
    ) -> None:
        """Takes an up worker out of service and starts bringing it back. A report about a
        worker already down, or about an earlier `epoch` of it, changes nothing."""
        worker = self.workers[worker_id]
        if worker.state != UP or epoch not in (None, worker.epoch):
            return
        worker.state, worker.reason = RESTARTING, describe(error)
        logger.warning("%s worker %s is down: %s", worker.role, worker_id, error)
        self._on_down(worker)
        self._recovering[worker_id] = asyncio.create_task(
            self._recover(worker), name=f"recover-{worker_id}"
        )
        self._notify()

    def report_stuck(self, worker_id: str, reason: str, epoch: int) -> None:
        """A worker alive but making no progress (`reason`) is killed, so that Ray restarts
        its process (one of its `max_restarts`), and is out of service until it is back, as
        one that died."""
        worker = self.workers[worker_id]
        if worker.state != UP or epoch != worker.epoch:
            return
        logger.error("%s worker %s is stuck (%s): restarting it", worker.role, worker_id, reason)
        ray.kill(worker.handle, no_restart=False)
        self.report_failure(worker_id, f"it was stuck: {reason}", epoch)

    def call_failed(self, worker_id: str, error: BaseException) -> None:
        """Reports a failed call if it says that the worker's process is gone; any other
        error is the call's own."""
        if isinstance(error, RayActorError):
            self.report_failure(worker_id, error)

    async def wait_for_change(self, timeout: float) -> None:
        """Returns when a worker's state changes, or after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            pass

    async def stop(self) -> None:
        tasks = list(self._recovering.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _recover(self, worker: Worker) -> None:
        delay, died_answers = self._backoff_s, 0
        try:
            while True:
                await asyncio.sleep(delay)
                if not ray.is_initialized():
                    # NOTE: Ray itself was shut down under the router: nothing will come back,
                    # and a call now would start a new local Ray instance in this process.
                    logger.info("Ray is shut down; %s stays down", worker.worker_id)
                    return
                try:
                    await asyncio.wait_for(worker.handle.start.remote(), START_TIMEOUT_S)
                    break
                except ActorDiedError as e:
                    died_answers += 1
                    if died_answers >= DIED_ANSWERS_FOR_DEAD:
                        worker.state, worker.reason = DEAD, describe(e)
                        logger.error("%s worker %s is dead", worker.role, worker.worker_id)
                        self._notify()
                        return
                except Exception as e:  # unreachable while Ray restarts it; try again
                    died_answers = 0
                    logger.info("%s is not back yet: %s", worker.worker_id, e)
                delay = min(2 * delay, self._max_backoff_s)
            worker.state, worker.reason = UP, ""
            worker.epoch += 1
            logger.warning(
                "%s worker %s is back (epoch %d)", worker.role, worker.worker_id, worker.epoch
            )
            self._on_up(worker)
            self._notify()
        finally:
            if self._recovering.get(worker.worker_id) is asyncio.current_task():
                del self._recovering[worker.worker_id]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
