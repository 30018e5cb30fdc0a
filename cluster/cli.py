"""The `pdserve` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from pdserve.api.errors import PdserveError


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _add_connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--api-key",
        default=os.environ.get("PDSERVE_API_KEY"),
        help="API key of the router (default: $PDSERVE_API_KEY)",
    )
    p.add_argument("--tls-root-cert", help="PEM file of the CA that signed the router's cert")


def _sampling_params(args: argparse.Namespace):
    from pdserve.api.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        stop=tuple(args.stop),
    )


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from pdserve.cluster.tiny_model import make_tiny_model

    sizes = {
        k: getattr(args, k)
        for k in (
            "num_layers",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "num_kv_heads",
            "vocab_size",
            "max_position_embeddings",
            "head_dim",
            "seed",
        )
        if getattr(args, k) is not None
    }
    path = make_tiny_model(args.dir, variant=args.variant, **sizes)
    print(f"wrote {args.variant} model to {path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling_params(args)
    if args.server:
        from pdserve.cluster.remote_generate import generate_remote

        return generate_remote(
            args.server,
            args.prompt,
            params,
            args.json,
            api_key=args.api_key,
            root_cert=args.tls_root_cert,
        )
    if not args.model:
        raise SystemExit("generate: give --model DIR or --server HOST:PORT")
    import torch

    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(EngineConfig(model=args.model, dtype=args.dtype, device=args.device))
    (c,) = llm.generate([args.prompt], params)
    if args.json:
        print(
            json.dumps(
                {
                    "prompt_token_ids": c.prompt_token_ids,
                    "token_ids": c.token_ids,
                    "text": c.text,
                    "finish_reason": c.finish_reason,
                    "timings": {"ttft_s": c.ttft_s, "total_s": c.total_s},
                }
            )
        )
    else:
        print(args.prompt + c.text)
    return 0


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "local.yaml"


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from pdserve.cluster.config import load_config
    from pdserve.cluster.launcher import serve_forever

    config = load_config(args.config or DEFAULT_CONFIG)
    if args.listen:
        config = dataclasses.replace(
            config, router=dataclasses.replace(config.router, listen=args.listen)
        )
    if args.config is None:
        from pdserve.cluster.demo import ensure_model

        ensure_model(config)
    host = config.router.listen.rpartition(":")[0]

    def ready(port: int) -> None:
        print(f"pdserve: serving {config.model} on {host}:{port} (Ctrl-C stops)", flush=True)

    asyncio.run(serve_forever(config, args.address, ready))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import grpc

    from pdserve.api.client import Client

    with Client(args.server, api_key=args.api_key, root_cert=args.tls_root_cert) as client:
        try:
            status = client.status(timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"pdserve status: {args.server}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    state = "serving" if status.serving else "NOT serving"
    print(f"{args.server}: {state} {status.model}, {status.inflight} requests in flight")
    print(format_workers(status.workers))
    return 0 if status.serving else 1


WORKER_COLUMNS = (
    # header, width, the value of a WorkerInfo
    ("worker", -16, lambda w: w.id),
    ("role", -9, lambda w: w.role),
    ("tp", 3, lambda w: w.tp),
    ("running", 8, lambda w: w.running),
    ("waiting", 8, lambda w: w.waiting),
    ("free/total blocks", 18, lambda w: f"{w.free_blocks}/{w.total_blocks}"),
    ("cached", 7, lambda w: w.cached_blocks),
    ("requests", 9, lambda w: w.requests_total),
    ("prompt computed", 16, lambda w: w.prompt_tokens_computed),
    ("prompt cached", 14, lambda w: w.prompt_tokens_cached),
    ("blocks recv", 12, lambda w: w.kv_blocks_received),
    ("blocks sent", 12, lambda w: w.kv_blocks_sent),
)


def format_workers(workers) -> str:
    """The table `pdserve status` prints: one line per worker (`WorkerInfo`s)."""

    def line(values) -> str:
        cells = (
            f"{v:<{-w}}" if w < 0 else f"{v:>{w}}" for (_, w, _), v in zip(WORKER_COLUMNS, values)
        )
        return " ".join(cells).rstrip()

    lines = [line(h for h, _, _ in WORKER_COLUMNS)]
    for w in workers:
        row = line(value(w) for _, _, value in WORKER_COLUMNS)
        lines.append(row + (f"  error: {w.error}" if w.error else ""))
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    from pdserve.cluster.bench import run_bench

    return run_bench(args)


def cmd_bench_index(args: argparse.Namespace) -> int:
    from pdserve.router.bench_index import report

    return report(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from pdserve.cluster.config import load_config
    from pdserve.cluster.demo import run_demo

    return run_demo(load_config(args.config or DEFAULT_CONFIG), args.max_tokens)


def cmd_bench_engine(args: argparse.Namespace) -> int:
    from pdserve.cluster.bench_engine import run_bench_engine

    return run_bench_engine(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny-model", help="write a small random model in HF layout")
    p.add_argument("dir")
    p.add_argument("--variant", choices=["llama", "qwen2"], default="llama")
    for flag in (
        "num-layers",
        "hidden-size",
        "intermediate-size",
        "num-heads",
        "num-kv-heads",
        "vocab-size",
        "max-position-embeddings",
        "head-dim",
        "seed",
    ):
        p.add_argument(f"--{flag}", type=int, default=None)
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("generate", help="complete one prompt, in-process or through a server")
    p.add_argument("prompt")
    p.add_argument("--model", help="model folder (in-process engine)")
    p.add_argument("--server", help="HOST:PORT of a running pdserve router")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    _add_connection_flags(p)
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="run the router and workers until SIGINT/SIGTERM")
    p.add_argument("--config", help="cluster YAML (default: deploy/local.yaml)")
    p.add_argument("--address", help="Ray address to join (default: start Ray locally)")
    p.add_argument("--listen", help="override router.listen (HOST:PORT)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="the workers of a running cluster; exit 0 when serving")
    p.add_argument("--server", required=True, help="HOST:PORT of a running pdserve router")
    p.add_argument("--timeout", type=float, default=10.0)
    _add_connection_flags(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("bench", help="TTFT, time per output token and throughput of a cluster")
    p.add_argument("--server", help="HOST:PORT of a running pdserve router")
    p.add_argument("--rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    p.add_argument("--num", type=int, default=64, help="number of requests")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and arrival times")
    p.add_argument("--colocated", action="store_true", help="also run one in-process engine")
    p.add_argument("--model", help="model folder for --colocated")
    p.add_argument(
        "--num-blocks", type=int, default=512, help="KV blocks of the --colocated engine"
    )
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.add_argument(
        "--workload",
        choices=["single", "multi-turn"],
        default="single",
        help="single: independent prompts; multi-turn: conversations sharing a system prompt",
    )
    p.add_argument("--conversations", type=int, default=32, help="multi-turn: conversations")
    p.add_argument("--turns", type=int, default=4, help="multi-turn: turns per conversation")
    p.add_argument("--concurrency", type=int, default=8, help="multi-turn: chats at a time")
    p.add_argument("--system-len", type=int, default=200, help="multi-turn: shared prefix")
    p.add_argument("--user-len", type=int, default=32, help="multi-turn: tokens per user turn")
    _add_connection_flags(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("bench-index", help="time of the router's prompt hashing and index match")
    from pdserve.router.bench_index import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench_index)

    p = sub.add_parser("demo", help="start the local cluster, stream a few requests, stop")
    p.add_argument("--config", help="cluster YAML (default: deploy/local.yaml)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench-engine", help="throughput of one in-process engine")
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compare-hf", action="store_true", help="also run transformers generate")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_engine)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (PdserveError, ValueError, OSError) as e:
        print(f"pdserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
