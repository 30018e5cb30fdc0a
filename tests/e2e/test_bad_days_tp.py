"""Fault injection on tensor-parallel workers (Ray on loopback: one prefill and one decode worker,
each a gang of 2 ranks, KV over gloo): a rank other than 0 killed with SIGKILL mid-stream or
mid-prefill takes its whole gang down, the gang comes back as new processes in a new epoch, no
request is lost, and a gang whose restarts are spent is dead with no rank left behind. Each
scenario adds a row to the fault table.

This module starts a cluster of its own, so it shuts Ray down on both sides; its name sorts
before the modules that share the session's cluster.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from cluster_helpers import worker_status
from engine_helpers import hf_greedy
from fault_helpers import (
    BACK_WITHIN_S,
    SERVING,
    Load,
    Monitor,
    Spec,
    assert_same_tokens,
    assert_transformers_tokens,
    leaked_blocks,
    make_specs,
    record,
    run_all,
    status_table,
    wait_state,
    wait_until,
    worker_pid,
)
from grpc_helpers import health_status
from transformers import AutoModelForCausalLM

from pdserve.api.client import Client
from pdserve.cluster.config import config_from_dict

pytestmark = pytest.mark.slow

MAX_RESTARTS = 1


@pytest.fixture(scope="module")
def gangs(tiny_llama_dir):
    import ray

    from pdserve.cluster.launcher import BackgroundCluster

    if ray.is_initialized():
        ray.shutdown()
    config = config_from_dict(
        {
            "model": str(tiny_llama_dir),
            "dtype": "float32",
            "kv_cache": {"num_blocks": 256},
            "prefill": {"workers": 1, "tp": 2, "token_budget": 256},
            "decode": {"workers": 1, "tp": 2},
            "kv_transfer": {"timeout_s": 3},
            "supervision": {
                "max_restarts": MAX_RESTARTS,
                "restart_backoff_s": 0.1,
                "restart_max_backoff_s": 1.0,
            },
            # NOTE: 0 sends every prompt through the prefill worker and its KV channels.
            "router": {"listen": "127.0.0.1:0", "local_prefill_max_tokens": 0},
        }
    )
    running = BackgroundCluster(config).start()
    yield running
    running.stop()
    ray.shutdown()


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture()
def client(gangs):
    with Client(gangs.target) as c:
        yield c


def _gang_pids(cluster, worker_id: str) -> list[int]:
    """The pids of the worker's ranks, rank 0 first (the others asked through rank 0, which
    created them)."""
    import ray

    leader = cluster.workers.all()[worker_id]
    ranks = ray.get(leader.__ray_call__.remote(lambda actor: actor._gang.ranks))
    others = [ray.get(r.__ray_call__.remote(lambda _: os.getpid())) for r in ranks]
    return [worker_pid(cluster, worker_id), *others]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_rank_1(cluster, client: Client, worker_id: str) -> tuple[list[int], float]:
    """Kills rank 1 of the worker; returns the gang's pids before, and the seconds until the
    worker was back up."""
    pids = _gang_pids(cluster, worker_id)
    killed_at = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    wait_state(client, worker_id, "restarting", 10)
    wait_state(client, worker_id, "up", BACK_WITHIN_S)
    return pids, time.monotonic() - killed_at


def _assert_new_gang(cluster, client: Client, worker_id: str, old: list[int]) -> None:
    """Every rank of the old gang is gone (none left waiting in a collective), and the new gang
    has all its ranks."""
    wait_until(lambda: not any(_alive(p) for p in old), "the old gang's processes are gone", 10)
    new = _gang_pids(cluster, worker_id)
    assert len(new) == 2 and not set(new) & set(old)
    (info,) = [w for w in client.status().workers if w.id == worker_id]
    assert [r.rank for r in info.ranks] == [0, 1]


def test_a_killed_decode_rank_restarts_its_gang_and_loses_no_request(gangs, client, hf_model):
    specs = make_specs(8, max_tokens=200, seed=3)
    reference = run_all(gangs.target, specs)
    assert all(o.code is None and len(o.tokens) == 200 for o in reference)

    monitor = Monitor(gangs.target)
    load = Load(gangs.target, specs)
    load.wait_streaming()
    assert worker_status(gangs, "decode-0").running > 0, "no request was decoding"
    old, back_s = _kill_rank_1(gangs, client, "decode-0")
    outcomes = load.join()
    # a new prompt of 3 full blocks: its KV crosses rebuilt channels to both new decode ranks
    fresh = make_specs(1, 4, prompt_len=48, seed=98)[0].prompt
    pinned = client.complete(fresh, max_tokens=4, timeout=30)
    samples = monitor.stop()
    leaked = record("kill rank 1 of the TP 2 decode worker", outcomes, leaked_blocks(gangs))

    # the only decode worker: each request waited for the new gang and resumed there
    assert_same_tokens(outcomes, reference)
    assert leaked == 0
    assert back_s < BACK_WITHIN_S
    _assert_new_gang(gangs, client, "decode-0", old)
    assert pinned.finish_reason == "length" and pinned.prefill_worker == "prefill-0"
    assert pinned.token_ids == hf_greedy(hf_model, fresh, 4)
    assert monitor.states_of("decode-0") == ["up", "restarting", "up"]
    # health says NOT_SERVING exactly while the gang is down
    for s in samples:
        assert s.serving == (s.states["decode-0"] == "up")
        assert not s.settled or (s.health == SERVING) == s.serving
    assert any(s.settled and not s.serving and s.health != SERVING for s in samples)
    assert samples[-1].serving


def test_a_killed_prefill_rank_restarts_its_gang_and_loses_no_request(gangs, client, hf_model):
    g = torch.Generator().manual_seed(22)
    # NOTE: 1500 tokens take six 256-token steps on the prefill worker: time to kill it there.
    specs = [Spec(torch.randint(3, 1000, (1500,), generator=g).tolist(), 8) for _ in range(4)]
    monitor = Monitor(gangs.target)
    load = Load(gangs.target, specs)
    wait_until(lambda: worker_status(gangs, "prefill-0").running > 0, "prefill-0 computes")
    old, back_s = _kill_rank_1(gangs, client, "prefill-0")
    outcomes = load.join()
    samples = monitor.stop()
    leaked = record("kill rank 1 of the TP 2 prefill worker", outcomes, leaked_blocks(gangs))

    assert_transformers_tokens(hf_model, specs, outcomes)
    assert leaked == 0
    assert back_s < BACK_WITHIN_S
    _assert_new_gang(gangs, client, "prefill-0", old)
    # the decode worker prefills meanwhile: the cluster serves, and says so
    assert all(s.health == SERVING and s.serving_before and s.serving for s in samples)
    assert monitor.states_of("prefill-0") == ["up", "restarting", "up"]
    prompt = torch.randint(3, 1000, (64,), generator=g).tolist()
    assert client.complete(prompt, max_tokens=2, timeout=30).prefill_worker == "prefill-0"


def test_a_gang_whose_restarts_are_spent_is_dead_with_no_rank_left(gangs, client):
    for _ in range(MAX_RESTARTS + 1):  # the earlier tests may have spent some already
        pids = _gang_pids(gangs, "prefill-0")
        os.kill(pids[1], signal.SIGKILL)
        wait_state(client, "prefill-0", "restarting", 10)
        wait_until(
            lambda: {w.id: w.state for w in client.status().workers}["prefill-0"] != "restarting",
            "prefill-0 back or dead",
            BACK_WITHIN_S,
        )
        if {w.id: w.state for w in client.status().workers}["prefill-0"] == "dead":
            break
    wait_state(client, "prefill-0", "dead", 1)
    wait_until(lambda: not any(_alive(p) for p in pids), "the dead gang's processes are gone", 10)
    # the decode worker prefills every prompt itself now
    prompt = torch.randint(3, 1000, (64,), generator=torch.Generator().manual_seed(5)).tolist()
    done = client.complete(prompt, max_tokens=2, timeout=30)
    assert done.finish_reason == "length" and done.prefill_worker == ""
    assert health_status(gangs.target, "") == SERVING
    lines, _ = status_table(gangs.target)
    assert lines["prefill-0"][2] == "dead" and lines["decode-0"][2] == "up"
