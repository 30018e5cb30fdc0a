"""What `pdserve bench` sends: requests of random token ids, their lengths drawn from a
distribution, arriving by a Poisson process, all at once (for fixed concurrency), or as a
trace file says.

A trace is JSONL in Mooncake's format, one request per line:
`{"timestamp": <ms after the start>, "input_length": <prompt tokens>, "output_length": <tokens>}`.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

DISTRIBUTIONS = ("fixed", "uniform", "lognormal")


@dataclass(frozen=True)
class BenchRequest:
    arrival_s: float  # after the start of the run
    prompt: list[int]
    max_tokens: int


@dataclass(frozen=True)
class Lengths:
    """Token counts around `mean`: `fixed`; `uniform` in mean * [1 - spread, 1 + spread];
    `lognormal` with median `mean` and `spread` the sigma of its log. Never below 1."""

    mean: int
    distribution: str = "fixed"
    spread: float = 0.0

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"length distribution must be one of {', '.join(DISTRIBUTIONS)}")
        if self.mean < 1 or self.spread < 0 or (self.distribution == "uniform" and self.spread > 1):
            raise ValueError("lengths need mean >= 1 and spread >= 0 (at most 1 for uniform)")

    def sample(self, rng: random.Random) -> int:
        if self.distribution == "uniform":
            low = self.mean * (1 - self.spread)
            return max(1, round(rng.uniform(low, self.mean * (1 + self.spread))))
        if self.distribution == "lognormal":
            return max(1, round(rng.lognormvariate(math.log(self.mean), self.spread)))
        return self.mean


def poisson_arrivals(num: int, rate: float, rng: random.Random) -> list[float]:
    """`num` arrival times of a Poisson process of `rate` requests/s; inf: all at the start."""
    arrivals, t = [], 0.0
    for _ in range(num):
        arrivals.append(t)
        t += 0.0 if math.isinf(rate) else rng.expovariate(rate)
    return arrivals


def random_requests(
    arrivals: list[float],
    prompt_lens: Lengths,
    output_lens: Lengths,
    vocab_size: int,
    rng: random.Random,
    max_model_len: int,
) -> list[BenchRequest]:
    """One request per arrival; a drawn pair that would not fit the context is shortened."""
    out = []
    for arrival in arrivals:
        prompt_len = min(prompt_lens.sample(rng), max_model_len - 2)
        max_tokens = min(output_lens.sample(rng), max_model_len - prompt_len - 1)
        out.append(BenchRequest(arrival, random_tokens(prompt_len, vocab_size, rng), max_tokens))
    return out


def read_trace(
    path: str | Path, vocab_size: int, rng: random.Random, max_model_len: int
) -> list[BenchRequest]:
    """The requests of a trace file, in arrival order; a bad line is refused by number."""
    out = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            arrival = float(entry["timestamp"]) / 1000
            prompt_len, output_len = int(entry["input_length"]), int(entry["output_length"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} line {number}: not a trace entry ({e})") from None
        if prompt_len < 1 or output_len < 1 or prompt_len + output_len >= max_model_len:
            raise ValueError(
                f"{path} line {number}: lengths {prompt_len} + {output_len} must be >= 1 and "
                f"fit the context of {max_model_len} tokens"
            )
        out.append(BenchRequest(arrival, random_tokens(prompt_len, vocab_size, rng), output_len))
    if not out:
        raise ValueError(f"{path} holds no request")
    return sorted(out, key=lambda r: r.arrival_s)


def random_tokens(n: int, vocab_size: int, rng: random.Random) -> list[int]:
    return [rng.randrange(vocab_size) for _ in range(n)]
