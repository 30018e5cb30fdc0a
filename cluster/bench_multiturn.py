"""`pdserve bench --workload multi-turn`: conversations against a running cluster.

`conversations` chats of `turns` turns each, `concurrency` chats at a time. Every chat opens
with the same `system_len`-token system prompt and a `user_len`-token user message; each later
turn's prompt is the previous prompt, its completion and a new `user_len`-token message (token
ids, greedy, `max_tokens` per turn, EOS ignored). Reported: the whole report of
`bench_report` over all turns, and the prefix hit rate of follow-up turns (cached / prompt
tokens, from the final responses' usage), TTFT p50/p95 of first and follow-up turns, and how
many turns each worker took (from the final responses' placement; "local" counts turns whose
decode worker computed the prompt itself). Run it once per `router.policy` to compare policies.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass

from pdserve.cluster.bench_report import RequestRecord, Slo, format_report, stats, summarize
from pdserve.cluster.bench_targets import GrpcTarget
from pdserve.cluster.bench_workload import random_tokens


@dataclass(frozen=True)
class MultiTurn:
    conversations: int
    turns: int
    concurrency: int
    system_len: int
    user_len: int
    max_tokens: int
    vocab_size: int
    seed: int = 0

    def context_len(self) -> int:
        """The longest prompt plus its completion (the last turn)."""
        return self.system_len + self.turns * (self.user_len + self.max_tokens)


@dataclass(frozen=True)
class Turn:
    conversation: int
    turn: int
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int
    prefill_worker: str
    decode_worker: str


async def run_multiturn(
    server: str, w: MultiTurn, slo: Slo, *, api_key: str | None, root_cert: str | None
) -> dict:
    rng = random.Random(w.seed)
    system = random_tokens(w.system_len, w.vocab_size, rng)
    users = [
        [random_tokens(w.user_len, w.vocab_size, rng) for _ in range(w.turns)]
        for _ in range(w.conversations)
    ]
    gate = asyncio.Semaphore(w.concurrency)
    records: list[RequestRecord] = []
    target = GrpcTarget(server, api_key, root_cert)

    async def chat(c: int) -> list[Turn]:
        turns, prompt = [], list(system)
        async with gate:
            for t in range(w.turns):
                prompt += users[c][t]
                record = await target.send(prompt, w.max_tokens)
                records.append(record)
                if not record.ok:
                    break
                prompt += record.output_ids
                turns.append(
                    Turn(
                        c,
                        t,
                        record.ttft,
                        record.prompt_tokens,
                        record.cached_tokens,
                        record.prefill_worker,
                        record.decode_worker,
                    )
                )
        return turns

    start = time.monotonic()
    try:
        chats = await asyncio.gather(*(chat(c) for c in range(w.conversations)))
    finally:
        await target.close()
    elapsed = time.monotonic() - start
    turns = [t for turns in chats for t in turns]
    return {**summarize(records, elapsed, slo), **summarize_multiturn(turns, elapsed)}


def summarize_multiturn(turns: list[Turn], elapsed: float) -> dict:
    follow = [t for t in turns if t.turn > 0]
    prompt = sum(t.prompt_tokens for t in follow)
    return {
        "turns": len(turns),
        "elapsed_s": elapsed,
        "follow_up_hit_rate": sum(t.cached_tokens for t in follow) / prompt if prompt else None,
        "ttft_first_ms": stats([t.ttft_s for t in turns if t.turn == 0]),
        "ttft_follow_up_ms": stats([t.ttft_s for t in follow]),
        "decode_turns": dict(sorted(Counter(t.decode_worker for t in turns).items())),
        "prefill_turns": dict(sorted(Counter(t.prefill_worker or "local" for t in turns).items())),
        "first_turns_by_decode": dict(
            sorted(Counter(t.decode_worker for t in turns if t.turn == 0).items())
        ),
    }


def print_multiturn(s: dict) -> None:
    print(format_report("multi-turn", s))

    def ms(p: dict) -> str:
        return "/".join("-" if p[k] is None else f"{p[k]:.1f}" for k in ("p50", "p95"))

    rate = s["follow_up_hit_rate"]
    print(
        f"{s['turns']} turns in {s['elapsed_s']:.2f} s; follow-up prefix hit rate "
        f"{'-' if rate is None else f'{100 * rate:.1f}%'}; TTFT p50/p95 first turns "
        f"{ms(s['ttft_first_ms'])} ms, follow-ups {ms(s['ttft_follow_up_ms'])} ms"
    )
    print(f"turns per decode worker: {s['decode_turns']}")
    print(f"first turns per decode worker: {s['first_turns_by_decode']}")
    print(f"turns per prefill worker: {s['prefill_turns']}")
