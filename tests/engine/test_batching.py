"""Continuous batching: one forward call per step, and batch composition never changes tokens."""

from __future__ import annotations

import torch
from engine_helpers import GREEDY, generate, make_engine, run_all

from pdserve.api.sampling import SamplingParams


def _prompts(n: int, vocab: int = 1000, seed: int = 7) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (5 + 13 * i,), generator=g).tolist() for i in range(n)]


def test_step_over_many_sequences_is_one_forward_call(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    calls = []
    forward = engine.model.forward

    def counting_forward(input_ids, *args, **kwargs):
        calls.append(input_ids.shape[0])
        return forward(input_ids, *args, **kwargs)

    engine.model.forward = counting_forward
    for i, p in enumerate(_prompts(6)):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(engine.step()) == 6
    assert calls == [sum(len(p) for p in _prompts(6))]
    engine.add_request("late", [5, 6, 7, 8], SamplingParams(max_tokens=2, temperature=0))
    assert len(engine.step()) == 7  # six decodes and one prefill, together
    assert len(calls) == 2 and calls[1] == 6 + 4


def test_sequences_joining_and_leaving_match_each_alone(tiny_llama_dir):
    prompts = _prompts(5)
    lengths = [20, 5, 33, 12, 1]
    alone = [
        generate(
            make_engine(tiny_llama_dir),
            [p],
            SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
        )[0]
        for p, n in zip(prompts, lengths)
    ]
    engine = make_engine(tiny_llama_dir)
    schedule = {}
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        schedule.setdefault(3 * i, []).append((f"r{i}", p, params))
    out = run_all(engine, schedule)
    assert [out[f"r{i}"] for i in range(5)] == alone


def test_preemption_in_a_small_pool_leaves_outputs_unchanged(tiny_llama_dir):
    prompts = _prompts(6)
    roomy = generate(make_engine(tiny_llama_dir), prompts)
    tight = make_engine(tiny_llama_dir, num_blocks=24)
    assert generate(tight, prompts) == roomy
    assert tight.stats().preemptions > 0
    assert tight.stats().free_blocks == 24


def test_chunked_prefill_gives_the_same_tokens(tiny_llama_dir):
    prompts = _prompts(4)
    whole = generate(make_engine(tiny_llama_dir), prompts, GREEDY)
    chunked = make_engine(tiny_llama_dir, max_num_batched_tokens=10)
    assert generate(chunked, prompts, GREEDY) == whole


def test_sampled_tokens_do_not_depend_on_batch_composition(tiny_llama_dir):
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=11)
    prompts = _prompts(3)
    alone = generate(make_engine(tiny_llama_dir), prompts[:1], params)[0]
    together = generate(make_engine(tiny_llama_dir), prompts, params)[0]
    assert together == alone


def test_seeded_penalised_request_gives_the_same_tokens_alone_and_inside_32_others(
    tiny_llama_dir,
):
    params = SamplingParams(
        max_tokens=40,
        temperature=0.8,
        top_p=0.95,
        seed=7,
        repetition_penalty=1.3,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        ignore_eos=True,
    )
    others = SamplingParams(max_tokens=40, temperature=1.0, seed=3, frequency_penalty=1.0)
    prompts = _prompts(33)
    alone = generate(make_engine(tiny_llama_dir), prompts[:1], params)[0]
    engine = make_engine(tiny_llama_dir, num_blocks=1024, max_num_batched_tokens=512)
    for i, prompt in enumerate(prompts[1:]):
        engine.add_request(f"other{i}", prompt, others)
    engine.add_request("penalised", prompts[0], params)
    assert run_all(engine)["penalised"] == alone
