"""`pdserve bench-tp`: decode speed of one engine at tensor-parallel sizes 1, 2, ..., and what
the collectives of one decode step cost.

Each size runs as that many processes (one per rank, one torch thread each, gloo on CPU), like
the ranks of a decode worker without the Ray around them: rank 0 schedules, broadcasts each
step and samples; the others follow. After the timed run the ranks time, with the step's own
shapes, the collectives a decode step makes: the step broadcast (header and index tensor), one
all-reduce per row-parallel layer and for the embedding, and the gather of the logits.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import torch

from pdserve.api.sampling import SamplingParams
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.parallel import TPGroup

_COLLECTIVE_REPEATS = 50


def _timed(fn, repeats: int = _COLLECTIVE_REPEATS) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _collectives(engine: LLMEngine, batch: int, width: int) -> dict[str, float]:
    """Seconds per decode step spent in each kind of collective, at the step's shapes."""
    tp, mc = engine.tp, engine.model_config
    if tp.size == 1:
        return {"broadcast_ms": 0.0, "all_reduce_ms": 0.0, "gather_ms": 0.0}
    hidden = torch.zeros(batch, mc.hidden_size, dtype=engine.dtype)
    logits = torch.zeros(batch, tp.vocab_per_rank(mc.vocab_size), dtype=engine.dtype)
    header = torch.zeros(6, dtype=torch.long)
    body = torch.zeros(3 * batch + batch * width + batch + 1 + batch, dtype=torch.long)
    all_reduces = 2 * mc.num_layers + 1
    return {
        "broadcast_ms": 1e3 * _timed(lambda: (tp.broadcast(header), tp.broadcast(body))),
        "all_reduce_ms": 1e3 * all_reduces * _timed(lambda: tp.all_reduce(hidden)),
        "gather_ms": 1e3 * _timed(lambda: tp.gather_last_dim(logits)),
    }


def _decode(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[float]:
    """Runs the prompts to the end on rank 0; returns the seconds of each step. Before each
    step a flag tells the other ranks to follow one more (0: the run is over)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", p, params)
    steps = []
    while engine.has_unfinished():
        if engine.tp.size > 1:
            engine.tp.broadcast(torch.ones(1, dtype=torch.long))
        start = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - start)
    if engine.tp.size > 1:
        engine.tp.broadcast(torch.zeros(1, dtype=torch.long))
    return steps


def _follow(engine: LLMEngine) -> None:
    while engine.tp.broadcast(torch.zeros(1, dtype=torch.long)).item():
        engine.runner.follow()


def _rank(rank: int, size: int, port: int, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(1)
    tp = TPGroup(rank, size)
    budget = max(4096, args.batch * args.prompt_len)
    config = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        num_blocks=args.batch * (-(-(args.prompt_len + args.max_tokens) // 16)) + 64,
        max_num_seqs=args.batch,
        max_num_batched_tokens=budget,
    )
    engine = LLMEngine(config, tp)
    tp.join("127.0.0.1", port, engine.device, 120)
    width = -(-(args.prompt_len + args.max_tokens) // config.block_size)
    if rank > 0:
        for _ in range(2):  # warm-up, then the timed run
            _follow(engine)
        _collectives(engine, args.batch, width)
        return
    g = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size
    prompts = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=g).tolist()
    _decode(engine, [p[:16] for p in prompts], 4)
    steps = _decode(engine, prompts, args.max_tokens)[1:]  # the first step is the prefill
    results.put(
        {
            "tp": size,
            "decode_tokens_per_s": args.batch * len(steps) / sum(steps),
            "step_ms": 1e3 * sum(steps) / len(steps),
            "weight_mib_per_rank": engine.weight_bytes / 2**20,
            **_collectives(engine, args.batch, width),
        }
    )


def _run_size(size: int, args: argparse.Namespace) -> dict:
    store = TPGroup.host_store("127.0.0.1", size, 120)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_rank, args=(r, size, store.port, args, results)) for r in range(size)
    ]
    for p in procs:
        p.start()
    try:
        return results.get(timeout=1800)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def run_bench_tp(args: argparse.Namespace) -> int:
    rows = [_run_size(size, args) for size in args.tp]
    print(
        f"{args.batch} x {args.prompt_len} -> {args.max_tokens} tokens, {args.dtype}, "
        "one torch thread per rank"
    )
    print(
        f"{'tp':>3} {'decode tok/s':>13} {'ms/step':>8} {'weights/rank':>13} "
        f"{'broadcast ms':>13} {'all-reduce ms':>14} {'gather ms':>10}"
    )
    for r in rows:
        print(
            f"{r['tp']:>3} {r['decode_tokens_per_s']:>13.0f} {r['step_ms']:>8.2f} "
            f"{r['weight_mib_per_rank']:>9.1f} MiB {r['broadcast_ms']:>13.3f} "
            f"{r['all_reduce_ms']:>14.3f} {r['gather_ms']:>10.3f}"
        )
    if args.json:
        print(json.dumps(rows))
    return 0
