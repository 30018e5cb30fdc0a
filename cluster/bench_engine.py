"""`pdserve bench-engine`: offline throughput of one engine, optionally beside transformers."""

from __future__ import annotations

import argparse
import json
import time

import torch

from pdserve.api.sampling import SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine


def _random_prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, prompt_len), generator=g).tolist()


def _run_engine(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", p, params)
    step_times = []
    start = time.perf_counter()
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    out_tokens = len(prompts) * max_tokens
    decode_steps = step_times[1:] or step_times
    return {
        "elapsed_s": elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (out_tokens + sum(map(len, prompts))) / elapsed,
        "steps": len(step_times),
        "mean_step_ms": 1e3 * sum(decode_steps) / len(decode_steps),
    }


def _run_hf(model_dir: str, prompts: list[list[int]], max_tokens: int, dtype: torch.dtype) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    ids = torch.tensor(prompts)
    kwargs = dict(
        max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0
    )
    with torch.inference_mode():
        model.generate(ids[:, :8], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        elapsed = time.perf_counter() - start
    out_tokens = len(prompts) * max_tokens
    return {
        "elapsed_s": elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (out_tokens + ids.numel()) / elapsed,
    }


def run_bench_engine(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = LLMEngine(
        EngineConfig(
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            max_num_seqs=max(256, args.batch),
            max_num_batched_tokens=max(4096, args.prompt_len),
        )
    )
    vocab = engine.model_config.vocab_size
    _run_engine(engine, _random_prompts(min(args.batch, 4), 16, vocab, seed=1), 4)  # warm-up
    prompts = _random_prompts(args.batch, args.prompt_len, vocab)
    result = {
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        **_run_engine(engine, prompts, args.max_tokens),
    }
    print(
        f"pdserve engine: {result['output_tokens_per_s']:.0f} output tok/s, "
        f"{result['total_tokens_per_s']:.0f} total tok/s, "
        f"{result['mean_step_ms']:.2f} ms/decode step ({result['steps']} steps)"
    )
    if args.compare_hf:
        hf = _run_hf(args.model, prompts, args.max_tokens, engine.dtype)
        result["hf"] = hf
        result["speedup_vs_hf"] = result["output_tokens_per_s"] / hf["output_tokens_per_s"]
        print(
            f"transformers:   {hf['output_tokens_per_s']:.0f} output tok/s, "
            f"{hf['total_tokens_per_s']:.0f} total tok/s"
        )
        print(f"ratio pdserve / transformers: {result['speedup_vs_hf']:.2f}x")
    if args.json:
        print(json.dumps(result))
    return 0
