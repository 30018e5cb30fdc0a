"""Small helpers for engine tests: run requests to completion, compare with transformers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pdserve.api.sampling import SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine

GREEDY = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)


def make_engine(model_dir, **kwargs) -> LLMEngine:
    kwargs.setdefault("num_blocks", 256)
    return LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", **kwargs))


def run_all(
    engine: LLMEngine, steps_between_adds: dict[int, list] | None = None
) -> dict[str, list[int]]:
    """Steps until idle; `steps_between_adds[k]` lists (id, prompt, params) added before step k."""
    out: dict[str, list[int]] = {}
    pending = dict(steps_between_adds or {})
    step = 0
    while engine.has_unfinished() or any(k >= step for k in pending):
        for rid, prompt, params in pending.pop(step, []):
            engine.add_request(rid, prompt, params)
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        step += 1
    return out


def generate(engine: LLMEngine, prompts: Sequence[Sequence[int]], params=GREEDY) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    out = run_all(engine)
    return [out[f"r{i}"] for i in range(len(prompts))]


def hf_greedy(hf_model, prompt: Sequence[int], max_tokens: int) -> list[int]:
    ids = torch.tensor([list(prompt)])
    with torch.inference_mode():
        out = hf_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()
