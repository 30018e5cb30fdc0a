"""The `pdserve` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable

from pdserve import __version__
from pdserve.api.errors import PdserveError
from pdserve.api.sampling import SamplingParams
from pdserve.cluster.config import DEVICES, DTYPES, ClusterConfig
from pdserve.cluster.model_shapes import SHAPES
from pdserve.router.logs import install as install_request_logs

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_SAMPLING = SamplingParams()


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends each flag's default to its help; a flag whose default is None says in its own
    help what happens when it is not given."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    d = DEFAULT_SAMPLING
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="tokens to generate")
    p.add_argument(
        "--temperature", type=float, default=d.temperature, help="0 is greedy; > 0 samples"
    )
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=d.top_k, help="sample among the k best; 0: all")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--ignore-eos", action="store_true", help="go on past end-of-sequence")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _add_connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--api-key",
        default=os.environ.get("PDSERVE_API_KEY"),
        help="API key of the router (default: $PDSERVE_API_KEY)",
    )
    p.add_argument(
        "--tls-root-cert",
        help="PEM file of the CA that signed the router's cert (default: none, plain TCP)",
    )


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
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
        raise SystemExit("generate: give --model DIR|FILE.gguf or --server HOST:PORT")
    import torch

    from pdserve.cluster.models import hf_folder
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.llm import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    model = hf_folder(args.model)
    llm = LLM(EngineConfig(model=model, dtype=args.dtype, device=args.device))
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


def _cluster_config(args: argparse.Namespace, log: Callable[[str], None]) -> ClusterConfig:
    """The config of `serve` and `demo`: the YAML (or the embedded default), the command-line
    overrides, and a default model when neither names one; a GGUF model is imported first."""
    import importlib.resources

    from pdserve.cluster.config import load_config
    from pdserve.cluster.models import default_model, hf_folder

    overrides: dict = {
        key: getattr(args, key) for key in ("model", "dtype", "device") if getattr(args, key)
    }
    for role in ("prefill", "decode"):
        workers = getattr(args, f"{role}_workers")
        if workers is not None:
            overrides[role] = {"workers": workers}
    if args.config is None:
        if "model" not in overrides:
            chosen = default_model()
            log(f"pdserve: no model given; serving {chosen.about}")
            overrides["model"] = chosen.path
        embedded = importlib.resources.files("pdserve.deploy").joinpath("local.yaml")
        with importlib.resources.as_file(embedded) as path:
            config = load_config(path, overrides)
    else:
        config = load_config(args.config, overrides)
    return dataclasses.replace(config, model=hf_folder(config.model))


def cmd_serve(args: argparse.Namespace) -> int:
    from pdserve.cluster.launcher import serve

    config = _cluster_config(args, print)
    doors = {"listen": args.listen, "openai_listen": args.openai_listen}
    doors = {key: value for key, value in doors.items() if value}
    if doors:
        config = dataclasses.replace(config, router=dataclasses.replace(config.router, **doors))
    host = config.router.listen.rpartition(":")[0]
    print(
        f"pdserve: starting Ray and {config.prefill.workers} prefill + {config.decode.workers} "
        f"decode workers on {config.device} (Ctrl-C stops)",
        flush=True,
    )

    def ready(port: int, http_port: int | None) -> None:
        print(f"pdserve: serving {config.model} on {host}:{port} (Ctrl-C stops)", flush=True)
        if http_port is not None:
            http_host = config.router.openai_listen or config.router.metrics_listen or ""
            what = "OpenAI API and /metrics" if config.router.openai_listen else "/metrics"
            print(f"pdserve: {what} on http://{http_host.rpartition(':')[0]}:{http_port}")

    try:
        serve(config, args.address, ready)
    except KeyboardInterrupt:
        print("pdserve: stopped", file=sys.stderr)
        return 130
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
    print(
        f"{args.server}: {state} {status.model}, {status.inflight} requests in flight "
        f"({status.queued} waiting for KV blocks)"
    )
    print(format_workers(status.workers))
    return 0 if status.serving else 1


WORKER_COLUMNS = (
    # header, width, the value of a WorkerInfo
    ("worker", -16, lambda w: w.id),
    ("role", -9, lambda w: w.role),
    ("state", -11, lambda w: w.state),
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
        lines += [_rank_line(w.role, r) for r in w.ranks]
    return "\n".join(lines)


def _rank_line(role: str, r) -> str:
    """A tensor-parallel rank (`RankInfo`) under its worker: node, memory, KV moved."""
    moved = "recv" if role == "decode" else "sent"
    return (
        f"  rank {r.rank}  node {r.node[:12]}  weights {_mib(r.weight_bytes)}"
        f"  kv cache {_mib(r.kv_cache_bytes)}  kv {moved} {_mib(r.kv_bytes)}"
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def cmd_bench(args: argparse.Namespace) -> int:
    from pdserve.cluster.bench import run_bench

    return run_bench(args)


def cmd_bench_index(args: argparse.Namespace) -> int:
    from pdserve.router.bench_index import report

    return report(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from pdserve.cluster.demo import run_demo

    return run_demo(_cluster_config(args, print), args.max_tokens)


def cmd_import_gguf(args: argparse.Namespace) -> int:
    from pdserve.cluster.gguf_import import import_gguf

    print(f"wrote {import_gguf(args.file, args.dir)}")
    return 0


def cmd_bench_tp(args: argparse.Namespace) -> int:
    from pdserve.cluster.bench_tp import run_bench_tp

    return run_bench_tp(args)


def cmd_bench_engine(args: argparse.Namespace) -> int:
    from pdserve.cluster.bench_engine import run_bench_engine

    return run_bench_engine(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve", description=__doc__, formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"pdserve {__version__}")
    parser.add_argument(
        "--log-level", default="WARNING", choices=LOG_LEVELS, type=str.upper, help="log level"
    )
    # NOTE: subcommands take --log-level too; SUPPRESS keeps the value given before them.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        choices=LOG_LEVELS,
        type=str.upper,
        help="log level (default: WARNING)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common], formatter_class=_HelpFormatter)

    p = command("make-tiny-model", "write a small random model in HF layout")
    p.add_argument("dir", help="folder to write")
    p.add_argument("--variant", choices=["llama", "qwen2"], default="llama", help="model family")
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
        p.add_argument(f"--{flag}", type=int, default=None, help="(default: the tiny model's)")
    p.set_defaults(func=cmd_make_tiny_model)

    p = command("import-gguf", "write a Hugging Face model folder from a GGUF file")
    p.add_argument("file", help="a .gguf file of a Llama or Qwen2 model")
    p.add_argument("dir", help="folder to write (replaced if present)")
    p.set_defaults(func=cmd_import_gguf)

    p = command("generate", "complete one prompt, in-process or through a server")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument(
        "--model",
        help="model folder or .gguf file, run in-process (default: none, give this or --server)",
    )
    p.add_argument(
        "--server", help="HOST:PORT of a running router (default: none, give this or --model)"
    )
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="weights and KV dtype")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="where the engine runs")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    _add_connection_flags(p)
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)

    p = command("serve", "run the router and workers until SIGINT/SIGTERM")
    _add_cluster_flags(p)
    p.add_argument("--address", help="Ray address to join (default: start Ray locally)")
    p.add_argument("--listen", help="HOST:PORT to serve on (default: router.listen)")
    p.add_argument(
        "--openai-listen",
        help="HOST:PORT of the OpenAI-compatible HTTP API and /metrics (default: "
        "router.openai_listen, off when unset)",
    )
    p.set_defaults(func=cmd_serve)

    p = command("status", "the workers of a running cluster; exit 0 when serving")
    p.add_argument("--server", required=True, help="HOST:PORT of a running router (required)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
    _add_connection_flags(p)
    p.set_defaults(func=cmd_status)

    p = command("bench", "load report of a cluster: latencies, throughput, goodput, plots")
    from pdserve.cluster.bench import add_arguments as add_bench_arguments

    add_bench_arguments(p)
    _add_connection_flags(p)
    p.set_defaults(func=cmd_bench)

    p = command("bench-index", "time of the router's prompt hashing and index match")
    from pdserve.router.bench_index import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench_index)

    p = command("demo", "start the local cluster, stream a few requests, stop")
    _add_cluster_flags(p)
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per answer")
    p.set_defaults(func=cmd_demo)

    p = command("bench-engine", "throughput of one in-process engine")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="model folder (no default: this or --shape is required)")
    which.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        help="a random model of this shape, built on --device (no default: this or --model)",
    )
    p.add_argument("--batch", type=int, default=32, help="prompts in the batch")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights and KV dtype")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="where the engine runs")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--compare-hf",
        action="store_true",
        help="also run transformers on the same device (CUDA: static cache + torch.compile)",
    )
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replay decode steps from CUDA graphs (CUDA only)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.set_defaults(func=cmd_bench_engine)

    p = command("bench-tp", "decode speed and collective costs at tensor-parallel sizes")
    p.add_argument("--model", required=True, help="model folder (required)")
    p.add_argument("--batch", type=int, default=8, help="prompts in the batch")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights and KV dtype")
    p.add_argument(
        "--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes (default: 1 2)"
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON on the last line")
    p.set_defaults(func=cmd_bench_tp)
    return parser


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    """`serve` and `demo`: a YAML, and flags that win over its keys."""
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="model folder or .gguf file (default: the config's `model`; without --config, "
        "SmolLM2-135M-Instruct when fetched, else the tiny test model)",
    )
    p.add_argument("--config", help="cluster YAML (default: the embedded deploy/local.yaml)")
    p.add_argument("--prefill-workers", type=int, help="prefill workers (default: the config's)")
    p.add_argument("--decode-workers", type=int, help="decode workers (default: the config's)")
    p.add_argument("--dtype", choices=DTYPES, help="weights and KV dtype (default: the config's)")
    p.add_argument("--device", choices=DEVICES, help="cpu or cuda (default: the config's)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level)
    for handler in logging.getLogger().handlers:
        install_request_logs(handler, "%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (PdserveError, ValueError, OSError) as e:
        print(f"pdserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
