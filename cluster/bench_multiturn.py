"""`pdserve bench --workload multi-turn`: conversations against a running cluster.

`conversations` chats of `turns` turns each, `concurrency` chats at a time. Every chat opens
with the same `system_len`-token system prompt and a `user_len`-token user message; each later
turn's prompt is the previous prompt, its completion and a new `user_len`-token message (token
ids, greedy, `max_tokens` per turn, EOS ignored). Reported: the prefix hit rate of follow-up
turns (cached / prompt tokens, from the final responses' usage), TTFT p50/p95 of first and
follow-up turns, and how many turns each worker took (from the final responses' placement;
"local" counts turns whose decode worker computed the prompt itself). Run it once per
`router.policy` to compare policies.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass

from pdserve.api.client import AsyncClient
from pdserve.cluster.bench import percentiles


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
    server: str, w: MultiTurn, *, api_key: str | None = None, root_cert: str | None = None
) -> dict:
    rng = random.Random(w.seed)
    system = [rng.randrange(w.vocab_size) for _ in range(w.system_len)]
    users = [
        [[rng.randrange(w.vocab_size) for _ in range(w.user_len)] for _ in range(w.turns)]
        for _ in range(w.conversations)
    ]
    sampling = {"max_tokens": w.max_tokens, "temperature": 0.0, "ignore_eos": True}
    gate = asyncio.Semaphore(w.concurrency)
    async with AsyncClient(server, api_key=api_key, root_cert=root_cert) as client:

        async def chat(c: int) -> list[Turn]:
            turns, prompt = [], list(system)
            async with gate:
                for t in range(w.turns):
                    prompt += users[c][t]
                    sent = time.monotonic()
                    first = None
                    result = None
                    async for delta in client.generate(prompt, **sampling):
                        if delta.token_ids and first is None:
                            first = time.monotonic()
                        result = delta if delta.finish_reason else result
                        prompt += delta.token_ids
                    turns.append(
                        Turn(
                            c,
                            t,
                            (first or time.monotonic()) - sent,
                            result.usage.prompt_tokens,
                            result.usage.cached_prompt_tokens,
                            result.placement.prefill_worker,
                            result.placement.decode_worker,
                        )
                    )
            return turns

        start = time.monotonic()
        chats = await asyncio.gather(*(chat(c) for c in range(w.conversations)))
        return summarize_multiturn([t for turns in chats for t in turns], time.monotonic() - start)


def summarize_multiturn(turns: list[Turn], elapsed: float) -> dict:
    follow = [t for t in turns if t.turn > 0]
    prompt = sum(t.prompt_tokens for t in follow)
    return {
        "turns": len(turns),
        "elapsed_s": elapsed,
        "follow_up_hit_rate": sum(t.cached_tokens for t in follow) / prompt if prompt else None,
        "ttft_first_ms": percentiles([t.ttft_s for t in turns if t.turn == 0]),
        "ttft_follow_up_ms": percentiles([t.ttft_s for t in follow]),
        "decode_turns": dict(sorted(Counter(t.decode_worker for t in turns).items())),
        "prefill_turns": dict(sorted(Counter(t.prefill_worker or "local" for t in turns).items())),
        "first_turns_by_decode": dict(
            sorted(Counter(t.decode_worker for t in turns if t.turn == 0).items())
        ),
    }


def print_multiturn(s: dict) -> None:
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
