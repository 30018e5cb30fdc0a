"""`pdserve bench`: latency and throughput of a running cluster under Poisson arrivals.

The workload is `num` random token-id prompts of `prompt_len` tokens, greedy, ignoring EOS so
every request produces exactly `max_tokens` tokens. `--colocated` runs the same workload (same
prompts, same arrival times) through one in-process engine, for comparison.

TTFT is measured from a request's send to its first token; time per output token (TPOT) is
(last token - first token) / (tokens - 1), per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from pdserve.api.client import AsyncClient
from pdserve.api.sampling import SamplingParams


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    arrivals: list[float]  # seconds after the start
    params: SamplingParams


@dataclass
class RequestTimes:
    sent: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    failed: bool = False


def make_workload(
    num: int, rate: float, prompt_len: int, max_tokens: int, vocab_size: int, seed: int = 0
) -> Workload:
    """Random prompts and Poisson arrival times (`rate` requests/s; inf sends all at once)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab_size) for _ in range(prompt_len)] for _ in range(num)]
    arrivals, t = [], 0.0
    for _ in range(num):
        arrivals.append(t)
        t += 0.0 if math.isinf(rate) else rng.expovariate(rate)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return Workload(prompts, arrivals, params)


def summarize(times: Sequence[RequestTimes], elapsed: float) -> dict:
    done = [t for t in times if not t.failed and t.first is not None]
    ttft = [t.first - t.sent for t in done]
    tpot = [(t.last - t.first) / (t.tokens - 1) for t in done if t.tokens > 1]
    output_tokens = sum(t.tokens for t in done)
    return {
        "requests": len(times),
        "failed": len(times) - len(done),
        "elapsed_s": elapsed,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / elapsed if elapsed > 0 else 0.0,
        "ttft_ms": percentiles(ttft),
        "tpot_ms": percentiles(tpot),
    }


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p95/p99 in milliseconds, linearly interpolated between ranks (None without data)."""
    out: dict[str, float | None] = {}
    ordered = sorted(values)
    for q in (50, 95, 99):
        if not ordered:
            out[f"p{q}"] = None
            continue
        pos = (len(ordered) - 1) * q / 100
        low, high = math.floor(pos), math.ceil(pos)
        value = ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
        out[f"p{q}"] = 1e3 * value
    return out


async def run_cluster(
    server: str, workload: Workload, *, api_key: str | None = None, root_cert: str | None = None
) -> dict:
    async with AsyncClient(server, api_key=api_key, root_cert=root_cert) as client:
        sampling = workload.params.to_dict()
        await client.complete(workload.prompts[0][:8], **{**sampling, "max_tokens": 2})
        start = time.monotonic()

        async def one(prompt: list[int], arrival: float) -> RequestTimes:
            await asyncio.sleep(max(0.0, start + arrival - time.monotonic()))
            times = RequestTimes(sent=time.monotonic())
            try:
                async for delta in client.generate(prompt, **sampling):
                    if delta.token_ids:
                        times.last = time.monotonic()
                        times.first = times.first or times.last
                        times.tokens += len(delta.token_ids)
            except grpc.RpcError:
                times.failed = True
            return times

        times = await asyncio.gather(
            *(one(p, a) for p, a in zip(workload.prompts, workload.arrivals))
        )
        return summarize(times, time.monotonic() - start)


def run_colocated(model: str, workload: Workload, dtype: str, device: str, num_blocks: int) -> dict:
    """Feeds the requests to one engine at their arrival times, stepping it in between."""
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=model, dtype=dtype, device=device, num_blocks=num_blocks))
    engine.add_request("warmup", workload.prompts[0][:8], workload.params)
    while engine.has_unfinished():
        engine.step()
    times: list[RequestTimes] = []
    start = time.monotonic()
    while len(times) < len(workload.prompts) or engine.has_unfinished():
        now = time.monotonic()
        while len(times) < len(workload.prompts) and start + workload.arrivals[len(times)] <= now:
            engine.add_request(str(len(times)), workload.prompts[len(times)], workload.params)
            times.append(RequestTimes(sent=now))
        if not engine.has_unfinished():
            time.sleep(max(0.0, start + workload.arrivals[len(times)] - now))
            continue
        outputs = engine.step()
        stepped = time.monotonic()
        for out in outputs:
            t = times[int(out.request_id)]
            t.first = t.first or stepped
            t.last = stepped
            t.tokens += len(out.new_token_ids)
    return summarize(times, time.monotonic() - start)


def _vocab_and_context(args: argparse.Namespace) -> tuple[int, int]:
    if args.server:
        from pdserve.api.client import Client

        with Client(args.server, api_key=args.api_key, root_cert=args.tls_root_cert) as client:
            status = client.status(timeout=10)
        return status.vocab_size, status.max_model_len
    from pdserve.engine.config import ModelConfig

    config = ModelConfig.from_model_dir(args.model)
    return config.vocab_size, config.max_position_embeddings


def _print_summary(name: str, s: dict) -> None:
    def ms(p: dict) -> str:
        return "/".join("-" if p[k] is None else f"{p[k]:.1f}" for k in ("p50", "p95", "p99"))

    print(
        f"{name:<10} {s['output_tokens_per_s']:8.1f} output tok/s   "
        f"TTFT p50/p95/p99 {ms(s['ttft_ms'])} ms   TPOT p50/p95/p99 {ms(s['tpot_ms'])} ms   "
        f"({s['requests']} requests, {s['failed']} failed, {s['elapsed_s']:.2f} s)"
    )


def run_bench(args: argparse.Namespace) -> int:
    if args.workload == "multi-turn":
        return _run_multiturn(args)
    if not args.server and not args.colocated:
        raise SystemExit("bench: give --server HOST:PORT, --colocated --model DIR, or both")
    if args.colocated and not args.model:
        raise SystemExit("bench: --colocated needs --model DIR")
    limits = _checked_limits(args, ("rate", "num", "prompt_len", "max_tokens"))
    if limits is None:
        return 1
    vocab_size, max_model_len = limits
    if args.prompt_len + args.max_tokens > max_model_len:
        raise SystemExit(
            f"bench: prompt-len + max-tokens must fit the context of {max_model_len} tokens"
        )
    workload = make_workload(
        args.num, args.rate, args.prompt_len, args.max_tokens, vocab_size, args.seed
    )
    result: dict = {
        "rate": "inf" if math.isinf(args.rate) else args.rate,
        "num": args.num,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
    }
    if args.server:
        result["cluster"] = asyncio.run(
            run_cluster(args.server, workload, api_key=args.api_key, root_cert=args.tls_root_cert)
        )
        _print_summary("cluster", result["cluster"])
    if args.colocated:
        result["colocated"] = run_colocated(
            args.model, workload, args.dtype, args.device, args.num_blocks
        )
        _print_summary("colocated", result["colocated"])
    if args.json:
        print(json.dumps(result))
    return (
        0 if all(result[k]["failed"] == 0 for k in ("cluster", "colocated") if k in result) else 1
    )


def _checked_limits(args: argparse.Namespace, positive: tuple[str, ...]) -> tuple[int, int] | None:
    """Refuses a flag of `positive` that is not > 0; returns the model's (vocab size, context),
    or None when the server could not say (the error is printed)."""
    for name in positive:
        if not getattr(args, name) > 0:
            raise SystemExit(f"bench: --{name.replace('_', '-')} must be > 0")
    try:
        return _vocab_and_context(args)
    except grpc.RpcError as e:
        print(f"pdserve bench: {args.server}: {e.code().name}: {e.details()}", file=sys.stderr)
        return None


def _run_multiturn(args: argparse.Namespace) -> int:
    from pdserve.cluster.bench_multiturn import MultiTurn, print_multiturn, run_multiturn

    if not args.server or args.colocated:
        raise SystemExit("bench: the multi-turn workload takes --server only")
    names = ("conversations", "turns", "concurrency", "system_len", "user_len", "max_tokens")
    limits = _checked_limits(args, names)
    if limits is None:
        return 1
    vocab_size, max_model_len = limits
    workload = MultiTurn(
        args.conversations,
        args.turns,
        args.concurrency,
        args.system_len,
        args.user_len,
        args.max_tokens,
        vocab_size,
        args.seed,
    )
    if workload.context_len() > max_model_len:
        raise SystemExit(
            f"bench: the last turn needs {workload.context_len()} tokens; the context holds "
            f"{max_model_len}"
        )
    result = asyncio.run(
        run_multiturn(args.server, workload, api_key=args.api_key, root_cert=args.tls_root_cert)
    )
    print_multiturn(result)
    if args.json:
        print(json.dumps(result))
    return 0
