"""The figures of a `pdserve bench` run, from what each request saw at the client.

Per request: TTFT is from its send to its first token; TPOT is (last token - first token) /
(tokens - 1); ITL are the gaps between successive token arrivals (a message carrying several
tokens spreads its gap over them, as vLLM's benchmark does); e2e is from send to the end.
Goodput is the rate of requests that completed within both SLOs (TTFT and TPOT; an SLO not
given always holds), over the run's wall time.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

QUANTILES = (50, 90, 95, 99)


@dataclass
class RequestRecord:
    """What the client saw of one request (`time.monotonic()` values); `error` is set when it
    failed. `cached_tokens`, `transfer_s` and `transfer_bytes` are the server's report, and so
    are `output_ids` and where it ran (`prefill_worker` empty: prefilled on the decode worker)
    on the gRPC door."""

    sent: float
    prompt_tokens: int
    first: float | None = None
    end: float | None = None
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    cached_tokens: int = 0
    transfer_s: float = 0.0
    transfer_bytes: int = 0
    error: str = ""
    output_ids: list[int] = field(default_factory=list)
    prefill_worker: str = ""
    decode_worker: str = ""
    _last: float | None = None

    def tokens_arrived(self, n: int, now: float) -> None:
        if n <= 0:
            return
        if self.first is None:
            self.first = now
        elif self._last is not None:
            self.itl.extend([(now - self._last) / n] * n)
        self._last = now
        self.tokens += n

    @property
    def ok(self) -> bool:
        return not self.error and self.first is not None and self.end is not None

    @property
    def ttft(self) -> float:
        assert self.first is not None
        return self.first - self.sent

    @property
    def tpot(self) -> float | None:
        if self.tokens < 2 or self._last is None or self.first is None:
            return None
        return (self._last - self.first) / (self.tokens - 1)

    @property
    def e2e(self) -> float:
        assert self.end is not None
        return self.end - self.sent


@dataclass(frozen=True)
class Slo:
    """Milliseconds; None: no bound."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def met(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        if self.ttft_ms is not None and 1e3 * r.ttft > self.ttft_ms:
            return False
        tpot = r.tpot
        return self.tpot_ms is None or tpot is None or 1e3 * tpot <= self.tpot_ms


def summarize(records: Sequence[RequestRecord], elapsed: float, slo: Slo = Slo()) -> dict:
    """The report as a JSON-able dict (latencies in milliseconds, throughputs per second)."""
    done = [r for r in records if r.ok]
    prompt_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.tokens for r in done)
    good = sum(slo.met(r) for r in records)
    transfers = [r for r in done if r.transfer_bytes]
    transfer_s = sum(r.transfer_s for r in transfers)
    transfer_bytes = sum(r.transfer_bytes for r in transfers)

    def rate(n: float) -> float:
        return n / elapsed if elapsed > 0 else 0.0

    return {
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        # by status (gRPC code, or HTTP status), with the first message of each
        "errors": {
            kind: {"count": n, "example": next(r.error for r in records if _kind(r) == kind)}
            for kind, n in Counter(_kind(r) for r in records if r.error).items()
        },
        "elapsed_s": elapsed,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "request_throughput": rate(len(done)),
        "output_throughput": rate(output_tokens),
        "total_token_throughput": rate(prompt_tokens + output_tokens),
        "prefix_hit_rate": sum(r.cached_tokens for r in done) / prompt_tokens
        if prompt_tokens
        else None,
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "goodput": rate(good),
        "slo_attainment": good / len(records) if records else None,
        "ttft_ms": stats([r.ttft for r in done]),
        "tpot_ms": stats([t for r in done if (t := r.tpot) is not None]),
        "itl_ms": stats([gap for r in done for gap in r.itl]),
        "e2e_ms": stats([r.e2e for r in done]),
        "transfer_ms": stats([r.transfer_s for r in transfers]),
        "transfers": len(transfers),
        "transfer_bytes": transfer_bytes,
        "transfer_bytes_per_s": transfer_bytes / transfer_s if transfer_s > 0 else None,
    }


def _kind(r: RequestRecord) -> str:
    return r.error.split(":")[0]


def stats(seconds: Sequence[float]) -> dict[str, float | None]:
    """Mean and p50/p90/p95/p99 in milliseconds, linearly interpolated between ranks (None
    without data)."""
    ordered = sorted(seconds)
    out: dict[str, float | None] = {"mean": 1e3 * sum(ordered) / len(ordered) if ordered else None}
    for q in QUANTILES:
        out[f"p{q}"] = 1e3 * quantile(ordered, q / 100) if ordered else None
    return out


def quantile(ordered: Sequence[float], q: float) -> float:
    pos = (len(ordered) - 1) * q
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def format_report(name: str, s: dict) -> str:
    """The report as the lines the CLI prints."""

    def ms(key: str) -> str:
        p = s[key]
        cells = ("-" if p[k] is None else f"{p[k]:.1f}" for k in ("p50", "p90", "p95", "p99"))
        mean = "-" if p["mean"] is None else f"{p['mean']:.1f}"
        name = key.removesuffix("_ms").upper()
        return f"{name:<11} mean {mean:>8} ms, p50/p90/p95/p99 {'/'.join(cells)} ms"

    hit = s["prefix_hit_rate"]
    slo = s["slo"]
    bounds = ", ".join(f"{k.removesuffix('_ms').upper()} <= {v} ms" for k, v in slo.items() if v)
    bandwidth = s["transfer_bytes_per_s"]
    lines = [
        f"== {name}: {s['completed']}/{s['requests']} requests completed, {s['failed']} failed, "
        f"in {s['elapsed_s']:.2f} s",
        f"throughput  {s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} output "
        f"tok/s, {s['total_token_throughput']:.1f} total tok/s",
        f"goodput     {s['goodput']:.2f} req/s ({bounds or 'no SLO given'}; "
        f"{100 * (s['slo_attainment'] or 0):.0f}% of requests)",
        f"prefix hit  {'-' if hit is None else f'{100 * hit:.1f}%'} of prompt tokens",
        *(ms(k) for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "transfer_ms")),
        f"KV moved    {s['transfers']} transfers, {s['transfer_bytes'] / 1e6:.1f} MB"
        + ("" if bandwidth is None else f", {bandwidth / 1e6:.1f} MB/s while moving"),
    ]
    lines += [
        f"failed      {e['count']} x {kind}, e.g. {e['example']}" for kind, e in s["errors"].items()
    ]
    return "\n".join(lines)
