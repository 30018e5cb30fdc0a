"""What the fault-injection tests share: requests streaming on threads with their outcomes, a
monitor of health and status, killing a worker's process, and the fault table's rows."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import torch
from cluster_helpers import wait_until_idle
from engine_helpers import hf_greedy
from fault_table import ROWS, Row
from grpc_health.v1 import health_pb2
from grpc_helpers import health_status

from pdserve.api.client import Client

SERVING = health_pb2.HealthCheckResponse.SERVING
REQUEST_BOUND_S = 120.0  # a request still open after this counts as hung
BACK_WITHIN_S = 30.0
# What Ray's errors carry and a client must never see.
RAY_INTERNALS = re.compile(r"actor_id|ActorID|pid[=:]|\bip[=:]|namespace|[0-9a-f]{32}|127\.0\.0\.1")


@dataclass(frozen=True)
class Spec:
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    decode_worker: str = ""
    request_id: str = ""


@dataclass
class Outcome:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""
    code: grpc.StatusCode | None = None
    details: str = ""


def make_specs(n: int, max_tokens: int, prompt_len: int = 40, seed: int = 0) -> list[Spec]:
    """Greedy and seeded-sampling requests, alternating."""
    g = torch.Generator().manual_seed(seed)
    return [
        Spec(
            torch.randint(3, 1000, (prompt_len + i,), generator=g).tolist(),
            max_tokens,
            temperature=0.0 if i % 2 == 0 else 0.9,
            seed=None if i % 2 == 0 else 1000 + i,
        )
        for i in range(n)
    ]


class Load:
    """Requests streaming, one thread each; `join` returns their outcomes."""

    def __init__(self, target: str, specs: list[Spec]) -> None:
        self.outcomes = [Outcome() for _ in specs]
        self._first = [threading.Event() for _ in specs]
        self._client = Client(target)
        self._threads = [
            threading.Thread(target=self._run, args=(i, spec), daemon=True)
            for i, spec in enumerate(specs)
        ]
        for t in self._threads:
            t.start()

    def _run(self, i: int, spec: Spec) -> None:
        out = self.outcomes[i]
        stream = self._client.generate(
            spec.prompt,
            timeout=REQUEST_BOUND_S,
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            seed=spec.seed,
            ignore_eos=True,
            decode_worker=spec.decode_worker,
            request_id=spec.request_id,
        )
        try:
            for msg in stream:
                out.tokens.extend(msg.token_ids)
                if msg.token_ids:
                    self._first[i].set()
                out.finish_reason = msg.finish_reason or out.finish_reason
        except grpc.RpcError as e:
            out.code, out.details = e.code(), e.details()
        finally:
            self._first[i].set()

    def wait_streaming(self, timeout: float = 60.0) -> None:
        """Until every request has its first tokens."""
        deadline = time.monotonic() + timeout
        for event in self._first:
            assert event.wait(max(0.0, deadline - time.monotonic())), "a request never streamed"

    def join(self) -> list[Outcome]:
        for t in self._threads:
            t.join(REQUEST_BOUND_S + 10)
        self._client.close()
        return self.outcomes


def run_all(target: str, specs: list[Spec]) -> list[Outcome]:
    return Load(target, specs).join()


@dataclass(frozen=True)
class Sample:
    """Health, between two status calls: a sample whose two statuses differ straddles a
    change of state, and health may show either side of it."""

    health: int
    serving_before: bool
    serving: bool
    states: dict[str, str]

    @property
    def settled(self) -> bool:
        return self.serving_before == self.serving


class Monitor:
    """Samples gRPC health and GetClusterStatus every 50 ms on a thread until `stop`."""

    def __init__(self, target: str) -> None:
        self.samples: list[Sample] = []
        self._target = target
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        wait_until(lambda: bool(self.samples), "the first sample", timeout=20)

    def _poll(self) -> None:
        with Client(self._target) as c:
            while not self._stop.is_set():
                before = c.status(timeout=10).serving
                health = health_status(self._target, "")
                status = c.status(timeout=10)
                states = {w.id: w.state for w in status.workers}
                self.samples.append(Sample(health, before, status.serving, states))
                time.sleep(0.05)

    def stop(self) -> list[Sample]:
        """Stops after one more sample (so the last sample reflects the caller's present)."""
        taken = len(self.samples)
        wait_until(lambda: len(self.samples) > taken + 1, "one more sample", timeout=20)
        self._stop.set()
        self._thread.join(20)
        return self.samples

    def states_of(self, worker_id: str) -> list[str]:
        """The worker's states in the order seen, repeats dropped."""
        seen: list[str] = []
        for sample in self.samples:
            if not seen or seen[-1] != sample.states[worker_id]:
                seen.append(sample.states[worker_id])
        return seen


def worker_pid(cluster, worker_id: str) -> int:
    import ray

    return ray.get(cluster.workers.all()[worker_id].__ray_call__.remote(lambda _: os.getpid()))


def kill_worker(cluster, worker_id: str) -> None:
    os.kill(worker_pid(cluster, worker_id), signal.SIGKILL)


def wait_state(client: Client, worker_id: str, state: str, timeout: float) -> float:
    """Seconds until status shows `worker_id` in `state`."""
    start = time.monotonic()
    while True:
        states = {w.id: w.state for w in client.status(timeout=10).workers}
        if states[worker_id] == state:
            return time.monotonic() - start
        assert time.monotonic() - start < timeout, f"{worker_id} never became {state}"
        time.sleep(0.05)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.005)


def leaked_blocks(cluster) -> int:
    statuses = wait_until_idle(cluster, timeout=30)
    return sum(s.total_blocks - s.free_blocks for s in statuses.values())


def record(fault: str, outcomes: list[Outcome], leaked: int) -> int:
    """Adds the scenario's row to the fault table; returns `leaked`."""
    hung = sum(o.code == grpc.StatusCode.DEADLINE_EXCEEDED for o in outcomes)
    clean = sum(
        o.code is not None
        and o.code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
        and o.code != grpc.StatusCode.DEADLINE_EXCEEDED
        and not RAY_INTERNALS.search(o.details)
        for o in outcomes
    )
    completed = sum(o.code is None and bool(o.finish_reason) for o in outcomes)
    ROWS.append(Row(fault, len(outcomes), completed, clean, hung, leaked))
    return leaked


def assert_transformers_tokens(hf_model, specs: list[Spec], outcomes: list[Outcome]) -> None:
    """Every request completed, with the tokens transformers' greedy decoding gives."""
    for i, (spec, got) in enumerate(zip(specs, outcomes, strict=True)):
        assert got.code is None, f"request {i}: {got.code}: {got.details}"
        assert got.tokens == hf_greedy(hf_model, spec.prompt, spec.max_tokens), f"request {i}"


def status_table(target: str) -> tuple[dict[str, list[str]], str]:
    """`pdserve status` against the router: its worker lines by worker id, and the text of
    those lines (it must exit 0)."""
    cli = subprocess.run(
        [sys.executable, "-m", "pdserve.cluster.cli", "status", "--server", target],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr
    rows = cli.stdout.splitlines()[2:]
    return {line.split()[0]: line.split() for line in rows}, "\n".join(rows)


def assert_same_tokens(outcomes: list[Outcome], reference: list[Outcome]) -> None:
    for i, (got, want) in enumerate(zip(outcomes, reference)):
        assert got.code is None, f"request {i}: {got.code}: {got.details}"
        assert got.finish_reason == "length", f"request {i}"
        assert got.tokens == want.tokens, f"request {i} differs from the undisturbed run"
