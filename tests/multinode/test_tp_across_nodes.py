"""A simulated multi-node Ray cluster on loopback (`ray.cluster_utils.Cluster`): the router on
the head node, a prefill worker on a node with the `prefill` resource, a decode worker on a
node with `decode`, at prefill/decode TP sizes 1/2, 2/1 and 2/2. Requests cross nodes, match
transformers, and each decode rank receives exactly its own KV heads of the blocks it lacked,
from the prefill ranks that hold them: split heads (the tiny Llama's 2 KV heads) and
replicated ones (a 1-KV-head model)."""

from __future__ import annotations

import time

import pytest
import torch
from cluster_helpers import DTYPE_BYTES, HEAD_DIM, LAYERS, wait_until_idle
from engine_helpers import hf_greedy
from transformers import AutoModelForCausalLM

from pdserve.cluster.config import config_from_dict
from pdserve.engine.config import ModelConfig
from pdserve.engine.kv_transfer.routes import kv_routes

pytestmark = pytest.mark.slow

BS = 16
MAX_TOKENS = 12


LAYOUTS = [  # model, prefill TP, decode TP
    ("tiny_llama_dir", 1, 2),
    ("tiny_mqa_dir", 1, 2),
    ("tiny_llama_dir", 2, 1),
    ("tiny_llama_dir", 2, 2),
    ("tiny_mqa_dir", 2, 2),
]


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda p: f"{p[0][5:-4]}-p{p[1]}-d{p[2]}")
def layout(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(request, layout):
    return request.getfixturevalue(layout[0])


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def simulated():
    """One simulated cluster for every layout (starting one costs seconds, and several in a
    row have timed out on a loaded machine): a head node without worker resources, a node
    with 2 `prefill` and a node with 2 `decode`."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    for attempt in range(3):
        sim = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        try:
            sim.add_node(num_cpus=0, resources={"prefill": 2})
            sim.add_node(num_cpus=0, resources={"decode": 2})
            break
        except Exception:
            # NOTE: Ray gives a new node's raylet a fixed 30 s to register; on this shared
            # 2-core machine under a full test run that ran out twice in about ten starts.
            sim.shutdown()
            if attempt == 2:
                raise
    yield sim
    ray.shutdown()
    sim.shutdown()


@pytest.fixture(scope="module")
def nodes(simulated, model_dir, layout):
    import ray

    from pdserve.api.naming import NAMESPACE, actor_name
    from pdserve.cluster.launcher import BackgroundCluster

    _, prefill_tp, decode_tp = layout
    config = config_from_dict(
        {
            "model": str(model_dir),
            "dtype": "float32",
            "kv_cache": {"num_blocks": 128},
            "prefill": {"tp": prefill_tp},
            "decode": {"tp": decode_tp},
            "kv_transfer": {"timeout_s": 10},
            # NOTE: 0 sends every prompt the decode worker does not hold whole through the
            # prefill worker, so every request crosses the KV channels.
            "router": {"listen": "127.0.0.1:0", "local_prefill_max_tokens": 0},
        }
    )
    running = BackgroundCluster(config, address=simulated.address).start()
    yield running
    running.stop()
    for wid in ("prefill-0", "decode-0"):  # the next layout's workers take the same names
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                ray.get_actor(actor_name(wid), namespace=NAMESPACE)
            except ValueError:
                break
            time.sleep(0.1)


@pytest.fixture()
def client(nodes):
    from pdserve.api.client import Client

    with Client(nodes.target) as c:
        yield c


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _heads(model_dir, layout) -> tuple[list[int], list[int]]:
    """How many KV heads each prefill rank sends and each decode rank receives per token."""
    _, prefill_tp, decode_tp = layout
    routes = kv_routes(ModelConfig.from_model_dir(model_dir).num_kv_heads, prefill_tp, decode_tp)
    sent, received = [0] * prefill_tp, [0] * decode_tp
    for r in routes:
        n = r.src.stop - r.src.start
        sent[r.prefill_rank] += n
        received[r.decode_rank] += n
    return sent, received


def _bytes(heads: int, num_tokens: int) -> int:
    return LAYERS * 2 * heads * HEAD_DIM * num_tokens * DTYPE_BYTES


def _moved(before, after) -> tuple[list[int], list[int]]:
    """KV bytes each prefill rank sent and each decode rank received between two statuses."""

    def delta(worker: str) -> list[int]:
        return [a.kv_bytes - b.kv_bytes for b, a in zip(before[worker].ranks, after[worker].ranks)]

    return delta("prefill-0"), delta("decode-0")


def _expected(model_dir, layout, num_tokens: int) -> tuple[list[int], list[int]]:
    sent, received = _heads(model_dir, layout)
    return [_bytes(h, num_tokens) for h in sent], [_bytes(h, num_tokens) for h in received]


def test_ranks_run_on_their_nodes_and_each_holds_its_share_of_the_weights(nodes, client, layout):
    import ray

    from pdserve.cluster.cli import format_workers

    _, prefill_tp, decode_tp = layout
    statuses = wait_until_idle(nodes)
    prefill, decode = statuses["prefill-0"], statuses["decode-0"]
    assert (prefill.tp, decode.tp) == (prefill_tp, decode_tp)
    for worker in (prefill, decode):
        assert [r.rank for r in worker.ranks] == list(range(worker.tp))
        assert len({r.node for r in worker.ranks}) == 1, "a TP worker is packed on one node"
    head = ray.get_runtime_context().get_node_id()
    assert len({head, prefill.ranks[0].node, decode.ranks[0].node}) == 3
    whole = prefill.ranks[0].weight_bytes * prefill_tp
    for r in (*prefill.ranks, *decode.ranks):
        tp = prefill_tp if r in prefill.ranks else decode_tp
        assert r.weight_bytes == pytest.approx(whole / tp, rel=0.1)
    table = format_workers(client.status().workers)  # what `pdserve status` prints
    assert table.count("  rank 0  node ") == 2
    assert table.count("  rank 1  node ") == (prefill_tp > 1) + (decode_tp > 1)


def test_requests_cross_nodes_and_match_transformers(nodes, client, hf):
    for i, n in enumerate((5, 37, 120)):
        prompt = _tokens(n, i)
        r = client.complete(prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
        assert (r.prefill_worker, r.decode_worker) == ("prefill-0", "decode-0")
        assert r.token_ids == hf_greedy(hf, prompt, MAX_TOKENS)


def test_each_decode_rank_receives_exactly_its_heads_of_the_missing_blocks(
    nodes, client, hf, model_dir, layout
):
    first_prompt = _tokens(70, 10)
    before = wait_until_idle(nodes)
    first = client.complete(first_prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    after = wait_until_idle(nodes)
    assert first.token_ids == hf_greedy(hf, first_prompt, MAX_TOKENS)
    assert _moved(before, after) == _expected(model_dir, layout, len(first_prompt))
    # the request's own account: every decode rank's part of its KV
    assert first.timings["transfer_bytes"] == sum(_moved(before, after)[1])

    # the next turn: the decode worker holds the first turn's full blocks; only the rest moves
    history = first.prompt_token_ids + first.token_ids
    held = (len(history) - 1) // BS * BS
    prompt = history + _tokens(60, 11)
    r = client.complete(prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    final = wait_until_idle(nodes)
    assert (r.prefill_worker, r.decode_worker) == ("prefill-0", "decode-0")
    assert r.token_ids == hf_greedy(hf, prompt, MAX_TOKENS)
    assert _moved(after, final) == _expected(model_dir, layout, len(prompt) - held)


def test_a_broken_channel_falls_back_to_a_tp_prefill_on_the_decode_worker(
    nodes, client, hf, model_dir, layout
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

    # the rebuilt channels carry the next request's KV from every prefill rank to every
    # decode rank
    prompt = _tokens(50, 13)
    r = client.complete(prompt, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    assert r.prefill_worker == "prefill-0"
    assert r.token_ids == hf_greedy(hf, prompt, MAX_TOKENS)
    final = wait_until_idle(nodes)
    assert _moved(middle, final) == _expected(model_dir, layout, len(prompt))
    for s in final.values():
        assert s.free_blocks == s.total_blocks
