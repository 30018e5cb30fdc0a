"""A simulated multi-node Ray cluster on loopback (`ray.cluster_utils.Cluster`): the router on
the head node, a prefill worker on a node with the `prefill` resource, a decode worker of TP
size 2 on a node with `decode`. Requests cross nodes, match transformers, and each decode rank
receives exactly its own KV heads of the blocks it lacked: one of the tiny Llama's 2 KV heads
each, or the whole of a 1-KV-head model's replicated head."""

from __future__ import annotations

import pytest
import torch
from cluster_helpers import DTYPE_BYTES, HEAD_DIM, LAYERS, wait_until_idle
from engine_helpers import hf_greedy
from transformers import AutoModelForCausalLM

from pdserve.cluster.config import config_from_dict
from pdserve.engine.config import ModelConfig

pytestmark = pytest.mark.slow

BS = 16
MAX_TOKENS = 12


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_mqa_dir"])
def model_dir(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def nodes(model_dir):
    import ray
    from ray.cluster_utils import Cluster

    from pdserve.cluster.launcher import BackgroundCluster

    if ray.is_initialized():
        ray.shutdown()
    sim = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    sim.add_node(num_cpus=0, resources={"prefill": 1})
    sim.add_node(num_cpus=0, resources={"decode": 2})
    config = config_from_dict(
        {
            "model": str(model_dir),
            "dtype": "float32",
            "kv_cache": {"num_blocks": 128},
            "decode": {"tp": 2},
            "kv_transfer": {"timeout_s": 10},
            # NOTE: 0 sends every prompt the decode worker does not hold whole through the
            # prefill worker, so every request crosses the KV channels.
            "router": {"listen": "127.0.0.1:0", "local_prefill_max_tokens": 0},
        }
    )
    running = BackgroundCluster(config, address=sim.address).start()
    yield running
    running.stop()
    ray.shutdown()
    sim.shutdown()


@pytest.fixture()
def client(nodes):
    from pdserve.api.client import Client

    with Client(nodes.target) as c:
        yield c


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _rank_kv_bytes(model_dir, num_tokens: int) -> int:
    """What one of 2 decode ranks receives for `num_tokens`: its half of the KV heads, or the
    one head that both ranks hold."""
    heads = max(1, ModelConfig.from_model_dir(model_dir).num_kv_heads // 2)
    return LAYERS * 2 * heads * HEAD_DIM * num_tokens * DTYPE_BYTES


def _received(statuses) -> list[int]:
    return [r.kv_bytes for r in statuses["decode-0"].ranks]


def test_workers_run_on_their_nodes_and_decode_ranks_hold_half_the_weights(nodes, client):
    import ray

    from pdserve.cluster.cli import format_workers

    statuses = wait_until_idle(nodes)
    prefill, decode = statuses["prefill-0"], statuses["decode-0"]
    assert (prefill.tp, decode.tp) == (1, 2)
    assert [r.rank for r in decode.ranks] == [0, 1]
    assert len({r.node for r in decode.ranks}) == 1, "a TP worker is packed on one node"
    head = ray.get_runtime_context().get_node_id()
    assert len({head, prefill.ranks[0].node, decode.ranks[0].node}) == 3
    for r in decode.ranks:
        assert r.weight_bytes == pytest.approx(prefill.ranks[0].weight_bytes / 2, rel=0.1)
        assert r.kv_cache_bytes == decode.ranks[0].kv_cache_bytes
    table = format_workers(client.status().workers)  # what `pdserve status` prints
    assert table.count("  rank 1  node ") == 1 and table.count("  rank 0  node ") == 2


def test_requests_cross_nodes_and_match_transformers(nodes, client, hf):
    for i, n in enumerate((5, 37, 120)):
        prompt = _tokens(n, i)
        r = client.complete(prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        assert (r.prefill_worker, r.decode_worker) == ("prefill-0", "decode-0")
        assert r.token_ids == hf_greedy(hf, prompt, MAX_TOKENS)


def test_each_decode_rank_receives_exactly_its_heads_of_the_missing_blocks(
    nodes, client, hf, model_dir
):
    first_prompt = _tokens(70, 10)
    before = wait_until_idle(nodes)
    first = client.complete(first_prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    after = wait_until_idle(nodes)
    for b, a in zip(_received(before), _received(after)):
        assert a - b == _rank_kv_bytes(model_dir, len(first_prompt))

    # the next turn: the decode worker holds the first turn's full blocks; only the rest moves
    history = first.prompt_token_ids + first.token_ids
    held = (len(history) - 1) // BS * BS
    prompt = history + _tokens(60, 11)
    r = client.complete(prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    final = wait_until_idle(nodes)
    assert (r.prefill_worker, r.decode_worker) == ("prefill-0", "decode-0")
    assert r.token_ids == hf_greedy(hf, prompt, MAX_TOKENS)
    for a, f in zip(_received(after), _received(final)):
        assert f - a == _rank_kv_bytes(model_dir, len(prompt) - held)
    sent = final["prefill-0"].kv_bytes_sent - after["prefill-0"].kv_bytes_sent
    assert sent == 2 * _rank_kv_bytes(model_dir, len(prompt) - held)


def test_a_broken_channel_falls_back_to_a_tp_prefill_on_the_decode_worker(
    nodes, client, hf, model_dir
):
    import ray

    client.complete([9, 8, 7], max_tokens=1, temperature=0)  # the channels exist
    prompt = _tokens(90, 12)
    ray.get(nodes.workers.prefill["prefill-0"].inject_fault.remote("decode-0", 3))
    before = wait_until_idle(nodes)["decode-0"]
    broken = client.complete(prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    assert broken.token_ids == hf_greedy(hf, prompt, MAX_TOKENS)
    middle = wait_until_idle(nodes)
    assert middle["decode-0"].transfer_fallbacks == before.transfer_fallbacks + 1
    computed = middle["decode-0"].prompt_tokens_computed - before.prompt_tokens_computed
    assert computed == len(prompt)

    # the rebuilt channels carry the next request's KV to both ranks
    prompt = _tokens(50, 13)
    r = client.complete(prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    assert r.prefill_worker == "prefill-0"
    assert r.token_ids == hf_greedy(hf, prompt, MAX_TOKENS)
    final = wait_until_idle(nodes)
    for m, f in zip(_received(middle), _received(final)):
        assert f - m == _rank_kv_bytes(model_dir, len(prompt))
    for s in final.values():
        assert s.free_blocks == s.total_blocks
