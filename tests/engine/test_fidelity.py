"""Greedy outputs and logits equal Hugging Face transformers for the same weights."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import generate, hf_greedy, make_engine
from transformers import AutoModelForCausalLM, AutoTokenizer

from pdserve.api.sampling import SamplingParams
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.scheduler import ScheduledSeq
from pdserve.engine.sequence import Sequence

MODELS = ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_llama3_rope_dir"]
PROMPT_LENGTHS = [1, 5, 16, 17, 33, 64, 100, 250]


@pytest.fixture(params=MODELS)
def model_dir(request):
    return request.getfixturevalue(request.param)


def _prompts(vocab: int, lengths=PROMPT_LENGTHS) -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _engine_prompt_logits(engine, prompt: list[int]) -> torch.Tensor:
    """All-position logits of one prefill, through the engine's own runner and KV pool."""
    rid = f"logits-{len(prompt)}"
    engine.reserve(rid, prompt, SamplingParams())
    seq = Sequence(rid, list(prompt), len(prompt), SamplingParams(), seed=0)
    seq.block_ids = engine.block_ids(rid)
    runner: ModelRunner = engine.runner
    input_ids, positions, batch, _ = runner.prepare([ScheduledSeq(seq, len(prompt))])
    with torch.inference_mode():
        hidden = engine.model(input_ids, positions, batch, engine.kv_cache)
        return engine.model.compute_logits(hidden)


def test_prompt_logits_match_transformers(model_dir):
    engine = make_engine(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt in _prompts(engine.model_config.vocab_size, [7, 40, 300]):
        ours = _engine_prompt_logits(engine, prompt)
        with torch.inference_mode():
            ref = hf(torch.tensor([prompt])).logits[0].float()
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_batched_greedy_generation_matches_transformers(model_dir):
    engine = make_engine(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = _prompts(engine.model_config.vocab_size)
    ours = generate(engine, prompts)
    for prompt, got in zip(prompts, ours):
        ref = hf_greedy(hf, prompt, 64)
        assert len(set(ref)) >= 8, "reference completion is degenerate"
        assert got == ref


def test_text_prompt_tokenizes_like_autotokenizer(tiny_llama_dir):
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm import LLM

    llm = LLM(EngineConfig(model=str(tiny_llama_dir), num_blocks=64))
    hf_tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for text in ["Hello world", "  spaced   out\n\nlines ", "naïve café ☕ 日本語 🚀"]:
        assert llm.encode(text) == hf_tok(text)["input_ids"]
