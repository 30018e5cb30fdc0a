"""Decode steps replayed from CUDA graphs give what eager steps give."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import generate, make_engine

from pdserve.api.sampling import SamplingParams
from pdserve.engine.cuda_graphs import batch_buckets


def test_batch_buckets_cover_every_batch_size_up_to_the_limit():
    assert batch_buckets(256)[:12] == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80]
    assert batch_buckets(256)[-1] == 256
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(1) == [1]
    for limit in (1, 3, 20, 100, 256):
        buckets = batch_buckets(limit)
        assert all(any(b >= n for b in buckets) for n in range(1, limit + 1))
        assert buckets == sorted(set(buckets)) and buckets[-1] == limit


def test_cuda_graphs_setting_is_ignored_on_cpu(tiny_llama_dir):
    assert make_engine(tiny_llama_dir, cuda_graphs=True).runner.graphs is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_greedy_outputs_are_identical_with_and_without_cuda_graphs(tiny_llama_dir, batch):
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(3, 1000, (5 + 11 * i,), generator=g).tolist() for i in range(batch)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    eager = make_engine(tiny_llama_dir, device="cuda", cuda_graphs=False)
    graphs = make_engine(tiny_llama_dir, device="cuda", cuda_graphs=True)
    assert generate(graphs, prompts, params) == generate(eager, prompts, params)
    assert graphs.runner.graphs._graphs, "no decode step replayed a graph"
    assert eager.runner.graphs is None
