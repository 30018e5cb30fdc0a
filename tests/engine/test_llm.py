"""In-process generation from text: detokenization and stop strings over the engine."""

from __future__ import annotations

import dataclasses

import pytest

from pdserve.api.sampling import SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm import LLM

PARAMS = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(EngineConfig(model=str(tiny_llama_dir), num_blocks=64))


def test_text_equals_decoding_all_generated_tokens(llm):
    (c,) = llm.generate(["The river"], PARAMS)
    assert len(c.token_ids) == 40 and c.finish_reason == "length"
    assert c.text == llm.tokenizer.decode(c.token_ids, skip_special_tokens=True)


def test_stop_string_spanning_two_tokens_ends_the_request(llm):
    (full,) = llm.generate(["The river"], PARAMS)
    ids, text = full.token_ids, full.text
    ends = [len(llm.tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]
    # a boundary between tokens i and i+1 with two characters on each side, not seen earlier
    i = next(
        i
        for i in range(1, len(ids) - 1)
        if ends[i] - ends[i - 1] >= 2
        and ends[i + 1] - ends[i] >= 2
        and text.find(text[ends[i] - 2 : ends[i] + 2]) == ends[i] - 2
    )
    stop = text[ends[i] - 2 : ends[i] + 2]
    (stopped,) = llm.generate(["The river"], dataclasses.replace(PARAMS, stop=(stop,)))
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: ends[i] - 2]
    assert stopped.token_ids == ids[: i + 2]  # ends with the token that completed the match
    stats = llm.engine.stats()
    assert stats.free_blocks == stats.total_blocks
