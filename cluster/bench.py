"""`pdserve bench`: the operator's load report of a running cluster.

Requests of random token ids (greedy, EOS ignored, so each yields exactly its output length)
arrive by a Poisson rate, at a fixed concurrency, or as a trace file says, through the gRPC
port (`--server`) or the OpenAI-compatible HTTP door (`--openai-url`). The report
(`bench_report`) gives TTFT, TPOT, ITL and end-to-end percentiles, throughput, goodput under
`--ttft-ms`/`--tpot-ms`, prefix hit rate and KV transfer figures; `--sweep RATES` repeats the
run at each rate; `--json` prints it all as one object; `--plot DIR` draws it (`bench_plot`).
`--colocated` also runs the same requests through one in-process engine, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
import urllib.request
from collections.abc import Sequence

import grpc

from pdserve.cluster.bench_report import RequestRecord, Slo, format_report, summarize
from pdserve.cluster.bench_targets import GrpcTarget, OpenAITarget, Target
from pdserve.cluster.bench_workload import (
    BenchRequest,
    Lengths,
    poisson_arrivals,
    random_requests,
    read_trace,
)
from pdserve.cluster.config import DEVICES, DTYPES


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, total: int, label: str) -> None:
        self._total, self._label, self._done, self._failed = total, label, 0, 0
        self._on = sys.stderr.isatty()
        self._draw()

    def step(self, record: RequestRecord) -> None:
        self._done += 1
        self._failed += not record.ok
        self._draw()

    def _draw(self) -> None:
        if not self._on:
            return
        width = 30
        full = width * self._done // max(self._total, 1)
        bar = "#" * full + "." * (width - full)
        end = "\n" if self._done == self._total else ""
        failed = f", {self._failed} failed" if self._failed else ""
        print(
            f"\r{self._label} [{bar}] {self._done}/{self._total}{failed}",
            end=end,
            file=sys.stderr,
            flush=True,
        )


async def run_requests(
    target: Target, requests: Sequence[BenchRequest], concurrency: int | None, label: str
) -> tuple[list[RequestRecord], float]:
    """Sends each request at its arrival time (and with at most `concurrency` in flight);
    returns the records in request order and the wall time."""
    gate = asyncio.Semaphore(concurrency or len(requests) or 1)
    progress = Progress(len(requests), label)
    start = time.monotonic()

    async def one(request: BenchRequest) -> RequestRecord:
        await asyncio.sleep(max(0.0, start + request.arrival_s - time.monotonic()))
        async with gate:
            record = await target.send(request.prompt, request.max_tokens)
        progress.step(record)
        return record

    records = await asyncio.gather(*(one(r) for r in requests))
    return list(records), time.monotonic() - start


def model_limits(args: argparse.Namespace) -> tuple[str, int, int]:
    """(model name, vocab size, context) of the target (or of the --colocated model)."""
    if args.openai_url:
        request = urllib.request.Request(args.openai_url.rstrip("/") + "/v1/models")
        if args.api_key:
            request.add_header("Authorization", f"Bearer {args.api_key}")
        context = None
        if args.tls_root_cert:
            import ssl

            context = ssl.create_default_context(cafile=args.tls_root_cert)
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            model = json.loads(response.read())["data"][0]
        return model["id"], model["vocab_size"], model["max_model_len"]
    if args.server:
        from pdserve.api.client import Client

        with Client(args.server, api_key=args.api_key, root_cert=args.tls_root_cert) as client:
            status = client.status(timeout=10)
        return status.model, status.vocab_size, status.max_model_len
    from pdserve.engine.config import ModelConfig

    config = ModelConfig.from_model_dir(args.model)
    return args.model, config.vocab_size, config.max_position_embeddings


def make_target(args: argparse.Namespace, model: str) -> Target:
    if args.openai_url:
        return OpenAITarget(args.openai_url, model, args.api_key, args.tls_root_cert)
    return GrpcTarget(args.server, args.api_key, args.tls_root_cert)


def workload(
    args: argparse.Namespace, seed: int, rate: float, vocab_size: int, max_model_len: int
) -> list[BenchRequest]:
    rng = random.Random(seed)
    if args.trace:
        return read_trace(args.trace, vocab_size, rng, max_model_len)
    prompt = Lengths(args.prompt_len, args.lengths, args.length_spread)
    output = Lengths(args.max_tokens, args.lengths, args.length_spread)
    arrivals = poisson_arrivals(args.num, rate, rng)
    return random_requests(arrivals, prompt, output, vocab_size, rng, max_model_len)


async def run_cluster(
    args: argparse.Namespace, model: str, runs: list[tuple[float, list[BenchRequest]]]
) -> list[tuple[float, list[RequestRecord], float]]:
    """Each (rate, requests) run in turn against one target, after a warm-up request."""
    target = make_target(args, model)
    try:
        await target.send(runs[0][1][0].prompt[:8], 2)
        out = []
        for rate, requests in runs:
            label = f"rate {_rate_name(rate)}"
            records, elapsed = await run_requests(target, requests, args.concurrency, label)
            out.append((rate, records, elapsed))
        return out
    finally:
        await target.close()


def run_bench(args: argparse.Namespace) -> int:
    if args.workload == "multi-turn":
        return _run_multiturn(args)
    _check_args(args)
    slo = Slo(args.ttft_ms, args.tpot_ms)
    try:
        model, vocab_size, max_model_len = model_limits(args)
    except grpc.RpcError as e:
        print(f"pdserve bench: {args.server}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    if not args.trace and args.prompt_len + args.max_tokens > max_model_len:
        raise SystemExit(
            f"bench: prompt-len + max-tokens must fit the context of {max_model_len} tokens"
        )
    rates = args.sweep or [args.rate]
    # NOTE: each rate of a sweep gets prompts of its own, so no run hits the cache of another.
    runs = [
        (rate, workload(args, args.seed + i, rate, vocab_size, max_model_len))
        for i, rate in enumerate(rates)
    ]
    result: dict = {
        "target": "openai" if args.openai_url else "grpc",
        "model": model,
        "workload": _workload_settings(args),
        "runs": [],
    }
    records_by_run: dict[str, list[RequestRecord]] = {}
    if args.server or args.openai_url:
        for rate, records, elapsed in asyncio.run(run_cluster(args, model, runs)):
            name = f"rate {_rate_name(rate)}"
            summary = {"rate": _rate_name(rate), **summarize(records, elapsed, slo)}
            result["runs"].append(summary)
            records_by_run[name] = records
            print(format_report(name, summary))
    if args.colocated:
        from pdserve.cluster.bench_colocated import run_colocated

        records, elapsed = run_colocated(
            args.model, runs[0][1], args.dtype, args.device, args.num_blocks
        )
        result["colocated"] = {"rate": _rate_name(rates[0]), **summarize(records, elapsed, slo)}
        records_by_run["colocated"] = records
        print(format_report("colocated", result["colocated"]))
    if args.plot:
        from pdserve.cluster.bench_plot import plot_report

        for path in plot_report(args.plot, records_by_run, result["runs"]):
            print(f"wrote {path}")
    if args.json:
        print(json.dumps(result))
    summaries = result["runs"] + ([result["colocated"]] if args.colocated else [])
    return 0 if all(s["failed"] == 0 for s in summaries) else 1


def _rate_name(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def _workload_settings(args: argparse.Namespace) -> dict:
    if args.trace:
        return {"trace": args.trace, "concurrency": args.concurrency}
    names = ("num", "prompt_len", "max_tokens", "lengths", "length_spread", "concurrency", "seed")
    return {name: getattr(args, name) for name in names}


def _check_args(args: argparse.Namespace) -> None:
    if args.server and args.openai_url:
        raise SystemExit("bench: give --server or --openai-url, not both")
    if not (args.server or args.openai_url) and not args.colocated:
        raise SystemExit("bench: give --server HOST:PORT, --openai-url URL, or --colocated --model")
    if args.colocated and not args.model:
        raise SystemExit("bench: --colocated needs --model DIR")
    for name in ("num", "prompt_len", "max_tokens"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"bench: --{name.replace('_', '-')} must be > 0")
    rates = args.sweep or [args.rate]
    if not all(r > 0 for r in rates):
        raise SystemExit("bench: rates must be > 0")
    if args.concurrency is not None and args.concurrency < 1:
        raise SystemExit("bench: --concurrency must be >= 1")
    try:
        Lengths(args.prompt_len, args.lengths, args.length_spread)
    except ValueError as e:
        raise SystemExit(f"bench: {e}") from None


def parse_rates(text: str) -> list[float]:
    try:
        return [float(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("RATES is a comma-separated list of numbers") from None


def _run_multiturn(args: argparse.Namespace) -> int:
    from pdserve.cluster.bench_multiturn import MultiTurn, print_multiturn, run_multiturn

    if not args.server or args.colocated or args.openai_url:
        raise SystemExit("bench: the multi-turn workload takes --server only")
    names = ("conversations", "turns", "system_len", "user_len", "max_tokens")
    for name in names:
        if not getattr(args, name) > 0:
            raise SystemExit(f"bench: --{name.replace('_', '-')} must be > 0")
    try:
        _, vocab_size, max_model_len = model_limits(args)
    except grpc.RpcError as e:
        print(f"pdserve bench: {args.server}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    workload = MultiTurn(
        args.conversations,
        args.turns,
        args.concurrency or 8,
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
    slo = Slo(args.ttft_ms, args.tpot_ms)
    result = asyncio.run(
        run_multiturn(
            args.server, workload, slo, api_key=args.api_key, root_cert=args.tls_root_cert
        )
    )
    print_multiturn(result)
    if args.json:
        print(json.dumps(result))
    return 0 if result["failed"] == 0 else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    door = p.add_argument_group("target (one of)")
    door.add_argument("--server", help="HOST:PORT of a router's gRPC port (default: none)")
    door.add_argument(
        "--openai-url",
        help="base URL of a router's OpenAI-compatible door, e.g. http://127.0.0.1:8000 "
        "(default: none)",
    )
    arrivals = p.add_argument_group("arrivals")
    arrivals.add_argument(
        "--rate", type=float, default=float("inf"), help="Poisson requests/s (inf: all at once)"
    )
    arrivals.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="at most this many requests in flight (default: no bound; multi-turn: 8 chats)",
    )
    arrivals.add_argument(
        "--trace",
        help="JSONL of {timestamp (ms), input_length, output_length} per request, replacing "
        "--rate, --num and the lengths (default: none)",
    )
    arrivals.add_argument(
        "--sweep",
        type=parse_rates,
        default=None,
        metavar="RATES",
        help="comma-separated rates: one run per rate (default: one run at --rate)",
    )
    lengths = p.add_argument_group("requests")
    lengths.add_argument("--num", type=int, default=64, help="number of requests")
    lengths.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (mean)")
    lengths.add_argument("--max-tokens", type=int, default=64, help="output tokens (mean)")
    lengths.add_argument(
        "--lengths",
        choices=["fixed", "uniform", "lognormal"],
        default="fixed",
        help="distribution of prompt and output lengths",
    )
    lengths.add_argument(
        "--length-spread",
        type=float,
        default=0.5,
        help="uniform: +- this fraction of the mean; lognormal: sigma of the log",
    )
    lengths.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals")
    report = p.add_argument_group("report")
    report.add_argument("--ttft-ms", type=float, default=None, help="TTFT SLO (default: none)")
    report.add_argument("--tpot-ms", type=float, default=None, help="TPOT SLO (default: none)")
    report.add_argument(
        "--json", action="store_true", help="print one JSON object on the last line"
    )
    report.add_argument(
        "--plot", metavar="DIR", help="write PNG plots there (default: none; needs matplotlib)"
    )
    colocated = p.add_argument_group("colocated baseline")
    colocated.add_argument(
        "--colocated", action="store_true", help="also run one in-process engine"
    )
    colocated.add_argument("--model", help="model folder for --colocated (default: none)")
    colocated.add_argument(
        "--num-blocks", type=int, default=512, help="KV blocks of the --colocated engine"
    )
    colocated.add_argument("--dtype", default="auto", choices=DTYPES, help="dtype of --colocated")
    colocated.add_argument("--device", default="cpu", choices=DEVICES, help="device of --colocated")
    multi = p.add_argument_group("multi-turn workload")
    multi.add_argument(
        "--workload",
        choices=["single", "multi-turn"],
        default="single",
        help="single: independent prompts; multi-turn: conversations sharing a system prompt",
    )
    multi.add_argument("--conversations", type=int, default=32, help="multi-turn: conversations")
    multi.add_argument("--turns", type=int, default=4, help="multi-turn: turns per conversation")
    multi.add_argument("--system-len", type=int, default=200, help="multi-turn: shared prefix")
    multi.add_argument("--user-len", type=int, default=32, help="multi-turn: tokens per user turn")
