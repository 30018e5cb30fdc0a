"""`pdserve bench-engine`: offline throughput of one engine, optionally beside transformers.

Reports what a GPU user needs (gpt-fast style): output tokens/s, the decode step's wall time
beside the GPU's busy time in it (CUDA: kernel time from the profiler; CPU: wall only), and
the bandwidth the step achieves against the bytes it must read (weights + KV) and the
device's peak. `--shape llama-1b` builds a random model of a named shape on the engine's
device, so a GPU run needs no download. `--compare-hf` runs transformers on the same device:
eager `generate` on CPU, a static cache with `torch.compile` on CUDA (the fair baseline).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pdserve.api.sampling import SamplingParams
from pdserve.cluster.model_shapes import build_random_model
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.kernels.bench import peak_bandwidth


def _random_prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, prompt_len), generator=g).tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _add(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> None:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", p, params)


def _run_engine(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict:
    _add(engine, prompts, max_tokens)
    budget = engine.config.max_num_batched_tokens
    prefill_steps = -(-sum(map(len, prompts)) // budget)
    step_times = []
    _sync(engine.device)
    start = time.perf_counter()
    while engine.has_unfinished():
        t0 = time.perf_counter()
        engine.step()  # reads the sampled tokens: the step has finished on the device
        step_times.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    out_tokens = len(prompts) * max_tokens
    decode_steps = step_times[prefill_steps:] or step_times
    return {
        "elapsed_s": elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (out_tokens + sum(map(len, prompts))) / elapsed,
        "steps": len(step_times),
        "decode_step_ms": 1e3 * statistics.median(decode_steps),
    }


def _gpu_busy_ms(engine: LLMEngine, prompts: list[list[int]], steps: int = 8) -> float:
    """Median GPU kernel time of one decode step (torch.profiler), at the same batch."""
    from torch.profiler import ProfilerActivity, profile

    _add(engine, prompts, steps + 4)
    budget = engine.config.max_num_batched_tokens
    for _ in range(-(-sum(map(len, prompts)) // budget) + 1):
        engine.step()  # the prompts' prefill, then every sequence decodes
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
    while engine.has_unfinished():
        engine.step()
    busy_us = sum(
        e.self_device_time_total
        for e in prof.key_averages()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    return busy_us / 1e3 / steps


def _bytes_per_step(engine: LLMEngine, batch: int, context: int) -> float:
    """What one decode step must read at least: every weight once and the batch's KV."""
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    mc = engine.model_config
    kv_per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * engine.dtype.itemsize
    return weights + batch * context * kv_per_token


def _run_hf(
    model_dir: str, prompts: list[list[int]], max_tokens: int, dtype: torch.dtype, device: str
) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    ids = torch.tensor(prompts, device=device)
    kwargs = dict(
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=0,
        attention_mask=torch.ones_like(ids),
    )
    compiled = device.startswith("cuda")
    if compiled:
        # NOTE: with a static cache on CUDA, `generate` compiles the decode forward itself
        # (torch.compile, mode "reduce-overhead": CUDA graphs); the warm-up run pays for it.
        kwargs["cache_implementation"] = "static"
    with torch.inference_mode():
        short = {**kwargs, "max_new_tokens": 2, "min_new_tokens": 2}
        model.generate(ids, **(kwargs if compiled else short))
        _sync(torch.device(device))
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        _sync(torch.device(device))
        elapsed = time.perf_counter() - start
    out_tokens = len(prompts) * max_tokens
    return {
        "compiled": compiled,
        "elapsed_s": elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (out_tokens + ids.numel()) / elapsed,
        "ms_per_token_step": 1e3 * elapsed / max_tokens,
    }


def _model_dir(
    args: argparse.Namespace, dtype: str
) -> tuple[str, tempfile.TemporaryDirectory | None]:
    if args.model:
        return args.model, None
    tmp = tempfile.TemporaryDirectory(prefix=f"pdserve-{args.shape}-")
    torch_dtype = {"float32": torch.float32, "float16": torch.float16}.get(dtype, torch.bfloat16)
    build_random_model(args.shape, Path(tmp.name), torch_dtype, args.device)
    return tmp.name, tmp


def run_bench_engine(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir, tmp = _model_dir(args, args.dtype)
    engine = LLMEngine(
        EngineConfig(
            model=model_dir,
            dtype=args.dtype,
            device=args.device,
            max_num_seqs=max(256, args.batch),
            max_num_batched_tokens=max(4096, args.prompt_len),
            max_model_len=args.prompt_len + args.max_tokens + 64,
            cuda_graphs=args.cuda_graphs,
        )
    )
    vocab = engine.model_config.vocab_size
    warm = _random_prompts(args.batch, 16, vocab, seed=1)
    _run_engine(engine, warm, 4)  # warm-up (and, on CUDA, capture of this batch's graph)
    prompts = _random_prompts(args.batch, args.prompt_len, vocab)
    result = {
        "model": args.model or args.shape,
        "device": str(engine.device),
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "dtype": str(engine.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "cuda_graphs": bool(engine.runner.graphs),
        **_run_engine(engine, prompts, args.max_tokens),
    }
    step_s = result["decode_step_ms"] / 1e3
    floor = _bytes_per_step(engine, args.batch, args.prompt_len + args.max_tokens // 2)
    result["bytes_per_step"] = floor
    result["achieved_gb_s"] = floor / step_s / 1e9
    peak = None
    if engine.device.type == "cuda":
        result["gpu_busy_ms"] = _gpu_busy_ms(engine, _random_prompts(args.batch, 64, vocab, 2))
        name = torch.cuda.get_device_name(engine.device)
        peak = peak_bandwidth(name)
        result["gpu"] = name
        result["floor_ms"] = 1e3 * floor / peak if peak else None
    result["peak_gb_s"] = peak / 1e9 if peak else None
    busy = f", GPU busy {result['gpu_busy_ms']:.2f} ms" if "gpu_busy_ms" in result else ""
    limit = (
        f" = {100 * floor / step_s / peak:.0f}% of {peak / 1e9:.0f} GB/s peak"
        f" (floor {result['floor_ms']:.2f} ms/step)"
        if peak
        else ""
    )
    step = f"decode step {result['decode_step_ms']:.2f} ms wall{busy}"
    read = f"{floor / 1e6:.0f} MB read per step, {result['achieved_gb_s']:.1f} GB/s{limit}"
    print(
        f"pdserve engine: {result['output_tokens_per_s']:.0f} output tok/s, "
        f"{result['total_tokens_per_s']:.0f} total tok/s; {step}; {read}"
    )
    if args.compare_hf:
        hf = _run_hf(model_dir, prompts, args.max_tokens, engine.dtype, args.device)
        result["hf"] = hf
        result["speedup_vs_hf"] = result["output_tokens_per_s"] / hf["output_tokens_per_s"]
        kind = "static cache + torch.compile" if hf["compiled"] else "eager"
        print(
            f"transformers ({kind}): {hf['output_tokens_per_s']:.0f} output tok/s, "
            f"{hf['total_tokens_per_s']:.0f} total tok/s, {hf['ms_per_token_step']:.2f} ms/token"
        )
        print(f"ratio pdserve / transformers: {result['speedup_vs_hf']:.2f}x")
    if args.json:
        print(json.dumps(result))
    if tmp is not None:
        tmp.cleanup()
    return 0
