"""Small helpers for engine tests: run requests to completion, compare with transformers."""

from __future__ import annotations

import os
import subprocess
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


def _tp_rank(rank, size, port, model_dir, batches, kwargs, results) -> None:
    """One rank of an in-test tensor-parallel engine (a spawned process, real gloo)."""
    from pdserve.engine.parallel import TPGroup

    torch.set_num_threads(1)
    tp = TPGroup(rank, size)
    kwargs.setdefault("num_blocks", 256)
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", **kwargs), tp)
    tp.join("127.0.0.1", port, engine.device, 60)
    if rank == 0:
        outputs = [generate(engine, prompts) for prompts in batches]
        results.put((rank, engine.weight_bytes, engine.kv_cache_bytes, outputs))
        return
    results.put((rank, engine.weight_bytes, engine.kv_cache_bytes, None))
    try:
        while True:
            engine.runner.follow()
    except RuntimeError:  # rank 0 finished and left the group
        return


def tp_generate(model_dir, size: int, batches: list[list[list[int]]], **kwargs):
    """Greedy outputs of each batch of prompts (run one after the other, so a later batch can
    hit the prefix cache of an earlier one) through a `size`-rank engine; also each rank's
    (weight bytes, KV cache bytes)."""
    import multiprocessing as mp

    from pdserve.engine.parallel import TPGroup

    store = TPGroup.host_store("127.0.0.1", size, 60)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    args = (size, store.port, model_dir, batches, kwargs, results)
    procs = [ctx.Process(target=_tp_rank, args=(r, *args)) for r in range(size)]
    for p in procs:
        p.start()
    try:
        got = sorted((results.get(timeout=300) for _ in range(size)), key=lambda r: r[0])
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    memory = [(w, kv) for _, w, kv, _ in got]
    return got[0][3], memory


def _listening_rank(rank, size, host, port, joined, done) -> None:
    """One rank that joins a TP group at `host` and waits (a spawned process)."""
    from pdserve.engine.parallel import TPGroup

    tp = TPGroup(rank, size)
    tp.join(host, port, torch.device("cpu"), 60)
    x = tp.broadcast(torch.tensor([7 if rank == 0 else 0]))
    joined.put((rank, os.getpid(), x.item()))
    done.wait(60)


def tp_listening(size: int, host: str) -> list[list[str]]:
    """The local addresses that each rank of a `size`-rank TP group, joined at `host`, listens
    on (`ss -ltnp`) once a broadcast crossed it."""
    import multiprocessing as mp

    from pdserve.engine.parallel import TPGroup

    store = TPGroup.host_store(host, size, 60)
    ctx = mp.get_context("spawn")
    joined, done = ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_listening_rank, args=(r, size, host, store.port, joined, done))
        for r in range(size)
    ]
    for p in procs:
        p.start()
    try:
        ranks = sorted(joined.get(timeout=120) for _ in range(size))
        assert [x for _, _, x in ranks] == [7] * size, "the broadcast did not cross the group"
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
        return [
            [line.split()[3] for line in out.splitlines() if f"pid={pid}," in line]
            for _, pid, _ in ranks
        ]
    finally:
        done.set()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
