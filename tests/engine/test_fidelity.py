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


def test_last_layer_runs_only_the_sampled_rows_and_writes_every_tokens_kv(tiny_llama_dir):
    """A step's kept rows get the hidden states of the full forward; the cache gets every
    token's K/V either way, and the last layer's MLP sees the kept rows alone."""
    engine = make_engine(tiny_llama_dir)
    prompts = _prompts(engine.model_config.vocab_size, [5, 17, 40])
    scheduled = []
    for i, prompt in enumerate(prompts):
        engine.reserve(f"keep-{i}", prompt, SamplingParams())
        seq = Sequence(f"keep-{i}", list(prompt), len(prompt), SamplingParams(), seed=0)
        seq.block_ids = engine.block_ids(f"keep-{i}")
        # the middle prompt is a chunk that stops short of its end: it samples nothing
        scheduled.append(ScheduledSeq(seq, len(prompt) - (i == 1)))
    input_ids, positions, batch, sample_idx = engine.runner.prepare(scheduled)
    assert sample_idx.tolist() == [4, 5 + 16 + 40 - 1]
    mlp_rows = []
    engine.model.layers[-1].down.register_forward_hook(
        lambda _m, args, _out: mlp_rows.append(args[0].shape[0])
    )

    def forward(keep):
        engine.kv_cache.zero_()
        with torch.inference_mode():
            hidden = engine.model(input_ids, positions, batch, engine.kv_cache, keep=keep)
        return hidden, engine.kv_cache.clone()

    full, full_kv = forward(None)
    for keep in (sample_idx, sample_idx[:0]):
        kept, kept_kv = forward(keep)
        torch.testing.assert_close(kept, full[keep], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kept_kv, full_kv, atol=0, rtol=0)
    assert mlp_rows == [input_ids.numel(), 2, 0]
    logits = engine.runner.run(scheduled)  # the engine's own steps keep the sampled rows
    assert logits.shape[0] == 2 and mlp_rows[-1] == 2


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
