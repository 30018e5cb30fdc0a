"""A request resumed from (prompt, generated tokens, seed) continues as the uninterrupted one."""

from __future__ import annotations

import torch
from engine_helpers import make_engine, run_all

from pdserve.api.sampling import SamplingParams

PARAMS = SamplingParams(
    max_tokens=40,
    temperature=0.8,
    top_p=0.95,
    seed=1234,
    repetition_penalty=1.3,
    presence_penalty=0.4,
    frequency_penalty=0.3,
    ignore_eos=True,
)
PROMPT = [17, 230, 45, 999, 3, 81, 402, 77, 5]


def test_resumed_request_matches_uninterrupted(tiny_llama_dir):
    engine = make_engine(tiny_llama_dir)
    engine.add_request("full", PROMPT, PARAMS)
    full = run_all(engine)["full"]
    assert len(full) == 40 and len(set(full)) > 8

    resumed = make_engine(tiny_llama_dir)
    resumed.add_request("again", PROMPT, PARAMS, output_token_ids=full[:15])
    rest = run_all(resumed)["again"]
    assert full[:15] + rest == full


def test_resumed_plain_seeded_sampling_continues_identically(tiny_llama_dir):
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=9, ignore_eos=True)
    a = make_engine(tiny_llama_dir)
    a.add_request("x", PROMPT, params)
    full = run_all(a)["x"]
    b = make_engine(tiny_llama_dir)
    b.add_request("y", PROMPT, params, output_token_ids=full[:7])
    assert full[:7] + run_all(b)["y"] == full


def test_resumed_seeded_sampling_survives_the_recomputed_kv_of_its_output(tiny_llama_dir):
    """A resumed request prefills its earlier output, whose KV then differs from the decoded
    one in the last bits; the draw must not flip on that. (Inverse transform sampling did: both
    of these diverged, at tokens 167 and 189.)"""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 1000, (40 + i,), generator=g).tolist() for i in range(5)]
    cases = {0: prompts[0], 4: prompts[4]}
    full = make_engine(tiny_llama_dir)
    for i, prompt in cases.items():
        params = SamplingParams(max_tokens=200, temperature=0.9, seed=1000 + i, ignore_eos=True)
        full.add_request(str(i), prompt, params)
    expected = run_all(full)
    resumed = make_engine(tiny_llama_dir)
    for i, prompt in cases.items():
        params = SamplingParams(max_tokens=200, temperature=0.9, seed=1000 + i, ignore_eos=True)
        resumed.add_request(str(i), prompt, params, output_token_ids=expected[str(i)][:7])
    for key, rest in run_all(resumed).items():
        assert expected[key][:7] + rest == expected[key]
