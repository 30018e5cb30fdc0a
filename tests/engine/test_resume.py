"""A request resumed from (prompt, generated tokens, seed) continues as the uninterrupted one."""

from __future__ import annotations

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
