"""`pdserve bench-index`: the router's per-request cost of cache awareness.

Times, for one prompt of `prompt_len` tokens, hashing its blocks (`block_hashes`) and one
`RadixIndex.match` against an index of `blocks` (block, worker) pairs over `workers`
simulated workers. A quarter of the workers hold a prefix of the prompt, each to its own
depth; every other block is random.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import time
from collections.abc import Callable

from pdserve.api.block_hash import block_hashes
from pdserve.api.kv_events import BlockStored, KVSnapshot, WorkerLoad
from pdserve.router.index import RadixIndex

LOAD = WorkerLoad(running=0, waiting=0, free_blocks=0, total_blocks=0)


def build_index(prompt_hashes: list[int], blocks: int, workers: int, seed: int) -> RadixIndex:
    rng = random.Random(seed)
    index = RadixIndex()
    per_worker = blocks // workers
    for w in range(workers):
        held = prompt_hashes[: rng.randrange(len(prompt_hashes))] if w % 4 == 0 else []
        held = held[:per_worker]
        held += [rng.getrandbits(64) for _ in range(per_worker - len(held))]
        snapshot = KVSnapshot(f"decode-{w}", 1, 0, tuple(BlockStored(h, None) for h in held), LOAD)
        index.resync(snapshot)
    return index


def per_call_us(fn: Callable[[], object], repeats: int) -> float:
    """The median over 5 rounds of the mean time of one call, in microseconds."""
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        rounds.append((time.perf_counter() - start) / repeats)
    return 1e6 * sorted(rounds)[2]


def run(prompt_len: int, block_size: int, workers: int, sizes: list[int], seed: int) -> dict:
    rng = random.Random(seed)
    prompt = [rng.randrange(150_000) for _ in range(prompt_len)]
    salt = rng.getrandbits(64)
    hashes = block_hashes(prompt, block_size, salt)
    result = {
        "prompt_len": prompt_len,
        "block_size": block_size,
        "workers": workers,
        "hash_us": per_call_us(lambda: block_hashes(prompt, block_size, salt), 200),
        "match_us": {},
    }
    for blocks in sizes:
        index = build_index(hashes, blocks, workers, seed)
        assert len(index) == blocks - blocks % workers
        result["match_us"][blocks] = per_call_us(functools.partial(index.match, hashes), 1000)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-len", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--blocks", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")


def report(args: argparse.Namespace) -> int:
    r = run(args.prompt_len, args.block_size, args.workers, args.blocks, args.seed)
    print(f"{r['prompt_len']}-token prompt, block {r['block_size']}: hashing {r['hash_us']:.1f} us")
    for blocks, us in r["match_us"].items():
        print(f"match against {blocks:,} indexed blocks over {r['workers']} workers: {us:.1f} us")
    if args.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m pdserve.router.bench_index", description=__doc__
    )
    add_arguments(parser)
    raise SystemExit(report(parser.parse_args()))
