"""The router's Prometheus metrics, served as `/metrics` by its HTTP door.

Per-request figures are observed here, in the router, from each request's final response
(the workers' queue, prefill and transfer figures ride on it). Per-worker figures come from the
workers' status calls, asked when `/metrics` is scraped: no second scraping system to run.
Each router has its own registry, so several routers in one process (tests) do not collide.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pdserve.api.errors import CapacityExceeded, PdserveError
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.status import WorkerAnswer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds, from sub-millisecond (a cached prompt's first token on a GPU) to minutes.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
_TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
_BYTE_BUCKETS = tuple(float(4**k) for k in range(5, 18))  # 1 KiB .. 16 GiB
_BANDWIDTH_BUCKETS = tuple(float(10**k) for k in range(5, 12))  # 100 kB/s .. 100 GB/s


class RouterMetrics:
    def __init__(self, inflight: Callable[[], int], queued: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pdserve_requests",
            "Requests that ended, by finish reason (none when they failed) and status code",
            ["finish_reason", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "pdserve_prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.cached_prompt_tokens = Counter(
            "pdserve_cached_prompt_tokens",
            "Prompt tokens of finished requests found in a prefix cache",
            registry=r,
        )
        self.generation_tokens = Counter(
            "pdserve_generation_tokens", "Tokens generated for finished requests", registry=r
        )
        self.failovers = Counter(
            "pdserve_failovers",
            "Requests moved off a failed worker of this role (prefill: the decode worker "
            "prefilled them)",
            ["role"],
            registry=r,
        )
        self.ttft = _histogram(r, "time_to_first_token_seconds", "From arrival to first token")
        self.tpot = Histogram(
            "pdserve_time_per_output_token_seconds",
            "Per request: (end - first token) / (tokens - 1)",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = _histogram(r, "e2e_request_latency_seconds", "From arrival to the end")
        self.overload_refusal = _histogram(
            r,
            "overload_refusal_seconds",
            "From arrival to the refusal of a request refused for overload (RESOURCE_EXHAUSTED: "
            "the queue is full, its deadline is shorter than the queue's wait, or "
            "router.max_inflight)",
        )
        self.queue = _histogram(r, "request_queue_time_seconds", "Waiting on the prefill worker")
        self.prefill = _histogram(r, "request_prefill_time_seconds", "Computing the prompt")
        self.transfer = _histogram(
            r, "kv_transfer_time_seconds", "From the first KV chunk sent to the last one landed"
        )
        self.transfer_bytes = Histogram(
            "pdserve_kv_transfer_bytes",
            "KV bytes moved per request from prefill to decode",
            buckets=_BYTE_BUCKETS,
            registry=r,
        )
        self.transfer_bandwidth = Histogram(
            "pdserve_kv_transfer_bandwidth_bytes_per_second",
            "Per request: KV bytes moved / transfer time",
            buckets=_BANDWIDTH_BUCKETS,
            registry=r,
        )
        running = Gauge(
            "pdserve_requests_running",
            "Requests in flight at the router, from arrival to end (waiting ones included)",
            registry=r,
        )
        running.set_function(inflight)
        waiting = Gauge(
            "pdserve_requests_waiting",
            "Requests waiting in the router's queue for KV blocks",
            registry=r,
        )
        waiting.set_function(queued)
        self.workers = WorkerCollector()
        r.register(self.workers)

    def request_done(self, final: pb.GenerateResponse) -> None:
        """Observes a request that ended normally, from its last response."""
        self.requests.labels(final.finish_reason, "OK").inc()
        u, t = final.usage, final.timings
        self.prompt_tokens.inc(u.prompt_tokens)
        self.cached_prompt_tokens.inc(u.cached_prompt_tokens)
        self.generation_tokens.inc(u.completion_tokens)
        self.e2e.observe(t.total_s)
        if u.completion_tokens == 0:
            return
        self.ttft.observe(t.ttft_s)
        if u.completion_tokens > 1:
            self.tpot.observe((t.total_s - t.ttft_s) / (u.completion_tokens - 1))
        self.queue.observe(t.queue_s)
        self.prefill.observe(t.prefill_s)
        if t.transfer_bytes:
            self.transfer.observe(t.transfer_s)
            self.transfer_bytes.observe(t.transfer_bytes)
            if t.transfer_s > 0:
                self.transfer_bandwidth.observe(t.transfer_bytes / t.transfer_s)

    def request_failed(self, error: BaseException, elapsed_s: float) -> None:
        """Observes a request that failed `elapsed_s` after its arrival."""
        if isinstance(error, CapacityExceeded):
            self.overload_refusal.observe(elapsed_s)
        if isinstance(error, PdserveError):
            code = error.grpc_code
        elif isinstance(error, (asyncio.CancelledError, ConnectionError)):  # the client left
            code = "CANCELLED"
        else:
            code = "INTERNAL"
        self.requests.labels("none", code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _histogram(registry: CollectorRegistry, name: str, documentation: str) -> Histogram:
    return Histogram(f"pdserve_{name}", documentation, buckets=_LATENCY_BUCKETS, registry=registry)


# (metric suffix, help, WorkerStatus attribute)
_WORKER_GAUGES = (
    ("running", "Requests in the worker's running batch", "running"),
    ("waiting", "Requests waiting on the worker (queued or reserved)", "waiting"),
    ("free_kv_blocks", "Free KV blocks", "free_blocks"),
    ("total_kv_blocks", "KV blocks of the worker's pool", "total_blocks"),
    ("cached_kv_blocks", "KV blocks held by the worker's prefix cache", "cached_blocks"),
)
_WORKER_COUNTERS = (
    ("requests", "Requests the worker took", "requests_total"),
    ("prompt_tokens_computed", "Prompt tokens the worker computed", "prompt_tokens_computed"),
    ("prompt_tokens_cached", "Prompt tokens found in its prefix cache", "prompt_tokens_cached"),
    ("kv_blocks_sent", "KV blocks sent to decode workers", "kv_blocks_sent"),
    ("kv_blocks_received", "KV blocks received from prefill workers", "kv_blocks_received"),
    ("kv_bytes_sent", "KV bytes sent to decode workers", "kv_bytes_sent"),
    ("kv_bytes_received", "KV bytes received from prefill workers", "kv_bytes_received"),
    (
        "kv_transfer_fallbacks",
        "Transfers that failed, so that the decode worker prefilled the request",
        "transfer_fallbacks",
    ),
)


class WorkerCollector:
    """Per-worker gauges and counters from the latest status answers (`update`)."""

    def __init__(self) -> None:
        self._answers: Sequence[WorkerAnswer] = ()

    def update(self, answers: Sequence[WorkerAnswer]) -> None:
        self._answers = tuple(answers)

    def collect(self) -> Iterator[Metric]:
        labels = ["worker", "role"]
        up = GaugeMetricFamily("pdserve_worker_up", "1 when the worker answered", labels=labels)
        hit = GaugeMetricFamily(
            "pdserve_worker_prefix_cache_hit_rate",
            "Cached / (cached + computed) prompt tokens since the worker started",
            labels=labels,
        )
        gauges = [
            (GaugeMetricFamily(f"pdserve_worker_{n}", h, labels=labels), a)
            for n, h, a in _WORKER_GAUGES
        ]
        counters = [
            (CounterMetricFamily(f"pdserve_worker_{n}", h, labels=labels), a)
            for n, h, a in _WORKER_COUNTERS
        ]
        for answer in self._answers:
            names = [answer.worker_id, answer.role]
            up.add_metric(names, 0.0 if answer.status is None or answer.error else 1.0)
            s = answer.status
            if s is None:
                continue
            for family, attribute in gauges + counters:
                family.add_metric(names, float(getattr(s, attribute)))
            seen = s.prompt_tokens_cached + s.prompt_tokens_computed
            hit.add_metric(names, s.prompt_tokens_cached / seen if seen else 0.0)
        yield up
        yield hit
        for family, _ in gauges + counters:
            yield family
