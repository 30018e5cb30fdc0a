"""Starting a cluster: Ray, the prefill and decode workers, and the router.

The process that runs this is the router process, so nothing here imports torch: workers
are created from their torch-free actor shells and load the engine in their own processes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pdserve.api.naming import NAMESPACE, actor_name
from pdserve.cluster.config import ClusterConfig, ConfigError, read_api_keys
from pdserve.cluster.preflight import (
    check_model,
    check_resources,
    local_gpu_count,
    needed_resources,
)
from pdserve.engine.config import EngineConfig, ModelConfig
from pdserve.engine.gang import GangSpec

if TYPE_CHECKING:
    from pdserve.router.router import Router

logger = logging.getLogger(__name__)
T = TypeVar("T")


def start_ray(config: ClusterConfig, address: str | None) -> None:
    """Checks the model, then joins the cluster at `address`, or starts a local Ray instance on
    loopback that has the `prefill` and `decode` resources the config's workers ask for. Either
    way, a config whose workers could never be placed is refused with one line."""
    check_model(config.model)
    # NOTE: must be set before `import ray`, or Ray listens on every interface (PLATFORM.md).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=True)
        try:
            check_resources(config, ray.cluster_resources(), f"the Ray cluster at {address}")
        except ConfigError:
            ray.shutdown()
            raise
        return
    resources = needed_resources(config)
    check_resources(config, {**resources, "GPU": local_gpu_count()}, "this machine")
    # NOTE: "local" starts a new instance; with no address Ray joins the cluster that `ray
    # start` (or a test's `ray.cluster_utils.Cluster`) last left in /tmp/ray/ray_current_cluster.
    ray.init(
        address="local",
        namespace=NAMESPACE,
        include_dashboard=False,
        resources={"prefill": resources["prefill"], "decode": resources["decode"]},
        log_to_driver=True,
    )


@dataclass
class Workers:
    """Each worker's rank 0 by id (the handle everyone talks to; its other tensor-parallel
    ranks die with it) and the placement groups, for tear-down."""

    prefill: dict[str, Any] = field(default_factory=dict)
    decode: dict[str, Any] = field(default_factory=dict)
    max_model_len: int = 0  # the longest sequence every worker accepts
    groups: list[Any] = field(default_factory=list)

    def all(self) -> dict[str, Any]:
        return {**self.prefill, **self.decode}


def _engine_config(config: ClusterConfig, role: str) -> EngineConfig:
    prefill = role == "prefill"
    return EngineConfig(
        model=os.path.abspath(config.model),
        dtype=config.dtype,
        device=config.device,
        block_size=config.block_size,
        num_blocks=config.kv_cache.num_blocks,
        kv_memory_fraction=config.kv_cache.memory_fraction,
        max_num_seqs=config.prefill.max_num_seqs if prefill else config.decode.max_num_seqs,
        max_num_batched_tokens=(
            config.prefill.token_budget if prefill else config.decode.token_budget
        ),
        enable_prefix_cache=config.prefix_caching,
        cuda_graphs=config.cuda_graphs and not prefill,
    )


def _start_gang(config: ClusterConfig, role: str, wid: str, secret: bytes, workers: Workers) -> Any:
    """Creates a worker of TP size n: a placement group of n bundles packed on one node, and the
    worker's rank 0 in bundle 0, which creates the other ranks in the others and fails with them
    as one gang (`engine/gang.py`). Each rank takes one unit of its role's resource (`prefill` or
    `decode`, which node types advertise) and one GPU on CUDA. Returns rank 0's handle."""
    import ray
    from ray.util.placement_group import placement_group

    from pdserve.decode_worker.actor import DecodeWorker
    from pdserve.prefill_worker.actor import PrefillWorker

    tp = getattr(config, role).tp
    gpus = 1 if config.device.startswith("cuda") else 0
    bundle = {role: 1, "GPU": gpus} if gpus else {role: 1}
    group = placement_group([bundle] * tp, strategy="STRICT_PACK")
    workers.groups.append(group)
    gang = GangSpec(tp, group, role, gpus)
    engine_config = _engine_config(config, role)
    args = (engine_config, config.kv_transfer.timeout_s, config.threads_per_worker, secret, gang)
    leader_cls = DecodeWorker if role == "decode" else PrefillWorker
    # Ray restarts a worker whose process dies (the router notices and re-registers it): rank 0,
    # with a fresh gang of the other ranks.
    options = gang.options(0, max_restarts=config.supervision.max_restarts)
    named = dict(name=actor_name(wid), namespace=NAMESPACE, **options)
    return ray.remote(leader_cls).options(**named).remote(wid, *args)


def launch_workers(config: ClusterConfig) -> Workers:
    """Creates every worker and returns once all have loaded their model."""
    # NOTE: KV channels admit only peers that prove this secret; it reaches the workers through
    # Ray (the constructor's arguments, which Ray passes again to a restarted worker).
    secret = secrets.token_bytes(32)
    workers = Workers()
    try:
        for i in range(config.decode.workers):
            wid = f"decode-{i}"
            workers.decode[wid] = _start_gang(config, "decode", wid, secret, workers)
        for i in range(config.prefill.workers):
            wid = f"prefill-{i}"
            workers.prefill[wid] = _start_gang(config, "prefill", wid, secret, workers)
        workers.max_model_len = min(
            _get_interruptibly([h.start.remote() for h in workers.all().values()])
        )
        # Channels open in the background; the first requests need not wait for them.
        for handle in workers.prefill.values():
            handle.connect.remote(list(workers.decode))
    except BaseException:  # KeyboardInterrupt too: Ctrl-C while models load
        stop_workers(workers)
        raise
    logger.info("workers ready: %s", ", ".join(workers.all()))
    return workers


def _get_interruptibly(refs: list[Any]) -> list[Any]:
    """`ray.get` that Ctrl-C can stop.

    NOTE: a plain `ray.get` waits inside Ray's C++ core, where Python never runs a signal
    handler: SIGINT was ignored until every worker had loaded its model."""
    import ray

    pending = refs
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.2)
    return ray.get(refs)


def stop_workers(workers: Workers) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    for handle in workers.all().values():
        try:
            ray.kill(handle)
        except Exception as e:  # a worker that already died is fine
            logger.debug("killing a worker: %s", e)
    for group in workers.groups:
        try:
            remove_placement_group(group)
        except Exception as e:  # the cluster is going away too
            logger.debug("removing a placement group: %s", e)


async def start_router(
    config: ClusterConfig, workers: Workers, listen: str | None = None
) -> tuple[Router, int]:
    """Starts the gRPC router in the running event loop; returns (router, port)."""
    from pdserve.api.block_hash import model_salt
    from pdserve.api.tokenizer import Tokenizer
    from pdserve.router.auth import ServerTLS
    from pdserve.router.router import Router

    model = ModelConfig.from_model_dir(config.model)
    settings = config.router
    router = Router(
        Tokenizer.from_model_dir(config.model),
        workers.prefill,
        workers.decode,
        vocab_size=model.vocab_size,
        max_model_len=workers.max_model_len,
        policy=settings.policy,
        max_inflight=settings.max_inflight,
        max_queued=settings.max_queued,
        model_name=os.path.basename(os.path.abspath(config.model)),
        # NOTE: the workers' EngineConfig gets the same salt and block size, so router and
        # workers name every KV block alike.
        block_size=config.block_size,
        salt=model_salt(config.model, config.dtype, config.block_size),
        cache_weight=settings.cache_weight,
        local_prefill_max_tokens=settings.local_prefill_max_tokens,
        request_table_size=settings.request_table_size,
        request_table_ttl_s=settings.request_table_ttl_s,
        restart_backoff_s=config.supervision.restart_backoff_s,
        restart_max_backoff_s=config.supervision.restart_max_backoff_s,
        stall_timeout_s=config.supervision.stall_timeout_s,
    )
    tls = ServerTLS.from_files(settings.tls_cert, settings.tls_key) if settings.tls_cert else None
    api_keys = read_api_keys(settings.api_keys_file) if settings.api_keys_file else ()
    port = await router.start(
        listen or settings.listen,
        tls=tls,
        api_keys=api_keys,
        http_listen=settings.openai_listen or settings.metrics_listen,
        openai=settings.openai_listen is not None,
    )
    return router, port


class BackgroundCluster:
    """A whole cluster whose router runs on a background thread: for tests and the demo.

    `target` is the router's HOST:PORT once `start()` returns; `http_target` is its HTTP
    door's, when the config has one.
    """

    def __init__(self, config: ClusterConfig, address: str | None = None) -> None:
        self.config = config
        self.address = address
        self.workers = Workers()
        self.router = None
        self.target = ""
        self.http_target = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="pdserve-router"
        )

    def start(self) -> BackgroundCluster:
        start_ray(self.config, self.address)
        self.workers = launch_workers(self.config)
        self._thread.start()
        host = self.config.router.listen.rpartition(":")[0]
        self.router, port = self.run(start_router(self.config, self.workers, f"{host}:0"))
        self.target = f"{host}:{port}"
        if self.router.http_port is not None:
            self.http_target = f"{host}:{self.router.http_port}"
        return self

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60) -> T:
        """Runs a coroutine on the router's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        if self.router is not None:
            self.run(self.router.stop(1.0))
        stop_workers(self.workers)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> BackgroundCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(
    config: ClusterConfig,
    address: str | None,
    on_ready: Callable[[int, int | None], None] | None = None,
) -> None:
    """The `pdserve serve` main loop: runs until SIGINT or SIGTERM, then stops the router and
    every worker it started. `on_ready(port, http_port)` is called once the router serves.

    NOTE: Ray and the workers start outside asyncio: `asyncio.run` turns the first Ctrl-C into
    a task cancellation, which start-up would not see until every worker loaded. Here SIGINT
    and SIGTERM raise KeyboardInterrupt wherever start-up is; during `ray.init` they are only
    noted and raised once it returns (an exception inside it crashed the process: SIGSEGV).
    """
    import signal

    import ray

    noted = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: noted.append(signum))
    try:
        start_ray(config, address)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.default_int_handler)
    try:
        if noted:
            raise KeyboardInterrupt
        workers = launch_workers(config)
        try:
            asyncio.run(_serve_router(config, workers, on_ready))
        finally:
            stop_workers(workers)
    finally:
        if not address:
            ray.shutdown()


async def _serve_router(
    config: ClusterConfig, workers: Workers, on_ready: Callable[[int, int | None], None] | None
) -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    router, port = await start_router(config, workers)
    if on_ready is not None:
        on_ready(port, router.http_port)
    await stop.wait()
    await router.stop(5.0)
