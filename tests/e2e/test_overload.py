"""Overload on a real cluster: more requests than the decode pool holds wait in the router's queue
and all complete; past the queue bound they are refused at once; huge text prompts are refused
before they are tokenized, without growing the router or delaying other requests.

The floods come from `flood_client.py` in a process of its own, so that the clients' memory and
CPU stay out of this process, which runs the router.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from cluster_helpers import wait_until_idle
from fault_table import ROWS, Row

from pdserve.api.client import Client, build_request
from pdserve.cluster.config import config_from_dict

pytestmark = pytest.mark.slow

# One KV block per request (block size 16): a prompt of 8 tokens and 8 generated ones.
PROMPT = [11, 12, 13, 14, 15, 16, 17, 18]
MAX_TOKENS = 8
POOL_REQUESTS = 100
FLOOD_CLIENT = Path(__file__).with_name("flood_client.py")


@pytest.fixture(scope="module")
def small_pool(tiny_llama_dir):
    """1 prefill + 1 decode worker whose KV pools hold `POOL_REQUESTS` requests each."""
    import ray

    from pdserve.cluster.launcher import BackgroundCluster

    if ray.is_initialized():  # another module's cluster: its worker names would clash
        ray.shutdown()
    config = config_from_dict(
        {
            "model": str(tiny_llama_dir),
            "dtype": "float32",
            "kv_cache": {"num_blocks": POOL_REQUESTS},
            # NOTE: 0 sends every prompt through a prefill worker and a KV reservation on the
            # decode worker: the path that used to refuse when the pool was full.
            "router": {"listen": "127.0.0.1:0", "local_prefill_max_tokens": 0},
        }
    )
    running = BackgroundCluster(config).start()
    yield running
    running.stop()
    ray.shutdown()


def flood(cluster, request, count: int, tmp_path: Path, timeout: float = 120) -> list[dict]:
    """Sends `request` `count` times at once from another process; each call's outcome."""
    path = tmp_path / "request.bin"
    path.write_bytes(request.SerializeToString())
    out = subprocess.run(
        [sys.executable, str(FLOOD_CLIENT), cluster.target, str(path), str(count), str(timeout)],
        capture_output=True,
        text=True,
        timeout=timeout + 60,
        check=True,
    )
    return json.loads(out.stdout)


def leaked_blocks(cluster) -> int:
    return sum(s.total_blocks - s.free_blocks for s in wait_until_idle(cluster).values())


def flood_request():
    return build_request(PROMPT, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


def test_five_times_the_kv_pool_at_once_all_complete(small_pool, tmp_path):
    results = flood(small_pool, flood_request(), 5 * POOL_REQUESTS, tmp_path)
    codes = [r["code"] for r in results]
    assert codes.count("OK") == len(results), {c: codes.count(c) for c in set(codes)}
    assert all(r["tokens"] == MAX_TOKENS for r in results)
    assert leaked_blocks(small_pool) == 0
    assert small_pool.router.num_inflight == 0 and small_pool.router.num_queued == 0


def test_past_the_queue_bound_the_rest_are_refused_within_100_ms_and_none_hangs(
    small_pool, tmp_path
):
    """500 calls at once, a queue bound of 50: every refusal comes within 100 ms of the call's
    arrival at the router, and every request admitted completes.

    What is timed is the router's `pdserve_overload_refusal_seconds`: from the moment the
    router's handler takes the call (gRPC has accepted it and hands it over) to the refusal,
    which the handler then passes to gRPC to send. It leaves out the time a call spends in the
    client and in gRPC's own queues before the handler takes it: the client-side times printed
    here (from each call's start in the flooding process to its status) hold that too. They are
    no shorter from a bare gRPC server whose handler refuses every call on its first line
    (medians of 0.08-0.41 s on the 2-core VM, 2026-11-30): gRPC handling 500 calls at once in
    two processes on two cores.
    """
    router = small_pool.router
    sample = router.metrics.registry.get_sample_value
    count, within = (
        "pdserve_overload_refusal_seconds_count",
        "pdserve_overload_refusal_seconds_bucket",
    )
    refused_before = sample(count)
    within_before = sample(within, {"le": "0.1"})
    within_1ms_before = sample(within, {"le": "0.001"})
    router.admission.max_queued = 50
    try:
        results = flood(small_pool, flood_request(), 5 * POOL_REQUESTS, tmp_path)
    finally:
        router.admission.max_queued = small_pool.config.router.max_queued
    codes = [r["code"] for r in results]
    # the pool's worth runs, the queue's worth waits and runs; the rest are refused
    assert codes.count("OK") >= POOL_REQUESTS + 50
    assert codes.count("OK") + codes.count("RESOURCE_EXHAUSTED") == len(results)
    refused = sorted(r["seconds"] for r in results if r["code"] == "RESOURCE_EXHAUSTED")
    assert refused
    assert sample(count) - refused_before == len(refused)
    assert sample(within, {"le": "0.1"}) - within_before == len(refused)
    within_1ms = sample(within, {"le": "0.001"}) - within_1ms_before
    print(
        f"\n500 at once, queue bound 50: {len(refused)} refused within 100 ms of arrival at "
        f"the router ({within_1ms:.0f} within 1 ms); client-side "
        f"{refused[len(refused) // 2] * 1000:.0f} ms median, {refused[-1] * 1000:.0f} ms max"
    )
    assert leaked_blocks(small_pool) == 0


def test_an_arrival_at_a_full_queue_is_refused_within_100_ms(small_pool, tmp_path):
    """One request holds the whole pool, 50 wait behind it: each newcomer is refused at once,
    timed by the client, one arrival at a time (a burst: the test above)."""
    admission = small_pool.router.admission
    admission.max_queued = 50
    room = small_pool.router.max_model_len - len(PROMPT)
    with Client(small_pool.target) as client:
        holder = client.generate(PROMPT, max_tokens=room, temperature=0, ignore_eos=True)
        next(holder)
        queued = []
        waiting = threading.Thread(
            target=lambda: queued.extend(flood(small_pool, flood_request(), 50, tmp_path))
        )
        waiting.start()
        try:
            deadline = time.monotonic() + 30
            while small_pool.router.num_queued < 50:
                assert time.monotonic() < deadline, small_pool.router.num_queued
                time.sleep(0.01)
            for _ in range(20):
                start = time.monotonic()
                with pytest.raises(grpc.RpcError) as info:
                    client.complete(PROMPT, max_tokens=MAX_TOKENS, timeout=10)
                elapsed = time.monotonic() - start
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert elapsed < 0.1, f"a refusal took {elapsed * 1000:.0f} ms"
        finally:
            admission.max_queued = small_pool.config.router.max_queued
            holder.cancel()
            waiting.join(120)
    assert [r["code"] for r in queued] == ["OK"] * 50  # they ran once the holder left
    assert leaked_blocks(small_pool) == 0


def test_fault_table_overload_with_twice_the_kv_capacity(small_pool, tmp_path):
    """The fault table's row (`fault_table`, printed at the end of the run)."""
    results = flood(small_pool, flood_request(), 2 * POOL_REQUESTS, tmp_path, timeout=60)
    completed = sum(r["code"] == "OK" for r in results)
    hung = sum(r["code"] == "DEADLINE_EXCEEDED" for r in results)
    failed_cleanly = len(results) - completed - hung
    leaked = leaked_blocks(small_pool)
    fault = "overload with 2x the KV capacity"
    ROWS.append(Row(fault, len(results), completed, failed_cleanly, hung, leaked))
    assert completed == len(results) and hung == 0 and leaked == 0


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class _PeakRSS:
    """Samples this process's RSS (the router's) every 10 ms while it runs."""

    def __init__(self) -> None:
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _small_request_seconds(client: Client) -> float:
    start = time.monotonic()
    assert client.complete("hello there", max_tokens=4, temperature=0).finish_reason
    return time.monotonic() - start


def test_forty_4mb_text_prompts_are_refused_at_once_without_growing_the_router(
    small_pool, tmp_path
):
    huge = build_request("the quick brown fox " * 200_000, max_tokens=4)  # 4 MB of text
    assert huge.ByteSize() >= 4_000_000
    with Client(small_pool.target) as client:
        normal = min(_small_request_seconds(client) for _ in range(3))
        baseline = _rss_bytes()
        flooded, small = [], []
        with _PeakRSS() as rss:
            flooding = threading.Thread(
                target=lambda: flooded.extend(flood(small_pool, huge, 40, tmp_path, timeout=30))
            )
            flooding.start()
            while flooding.is_alive():
                small.append(_small_request_seconds(client))
            flooding.join()
    results = flooded
    assert [r["code"] for r in results] == ["INVALID_ARGUMENT"] * 40
    slowest = max(r["seconds"] for r in results)
    assert slowest < 1.0, f"a 4 MB prompt took {slowest:.2f} s to be refused"
    growth = rss.peak - baseline
    assert growth < 200 << 20, f"the router grew by {growth >> 20} MiB"
    print(
        f"\n40 x 4 MB: refused in <= {slowest:.2f} s, router RSS +{growth >> 20} MiB peak, small "
        f"request {normal * 1000:.0f} ms alone, <= {max(small) * 1000:.0f} ms during"
    )
    # NOTE: the worst small request meets the moment the 160 MB land; a servicer that refuses
    # without reading them shows the same 0.1-0.5 s spikes on the 2-core VM (11 s before).
    assert small and max(small) < normal + 1.0, (normal, small)
