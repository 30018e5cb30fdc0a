"""The bench report's arithmetic on hand-made requests: goodput, percentiles, throughput, ITL."""

from __future__ import annotations

import pytest

from pdserve.cluster.bench_report import RequestRecord, Slo, summarize


def record(
    ttft: float, tpot: float, tokens: int, prompt: int = 100, cached: int = 0
) -> RequestRecord:
    """A request sent at t=0 whose tokens arrived one by one, `tpot` seconds apart."""
    r = RequestRecord(sent=0.0, prompt_tokens=prompt, cached_tokens=cached)
    for i in range(tokens):
        r.tokens_arrived(1, ttft + i * tpot)
    r.end = ttft + (tokens - 1) * tpot
    return r


def test_goodput_counts_requests_within_both_slos_over_the_wall_time():
    records = [
        record(0.10, 0.020, 11),  # meets both
        record(0.15, 0.030, 11),  # meets both (on the bounds)
        record(0.30, 0.010, 11),  # TTFT too slow
        record(0.05, 0.050, 11),  # TPOT too slow
        RequestRecord(sent=0.0, prompt_tokens=100, error="UNAVAILABLE: gone"),  # failed
    ]
    s = summarize(records, elapsed=2.0, slo=Slo(ttft_ms=150, tpot_ms=30))
    assert s["goodput"] == pytest.approx(2 / 2.0)
    assert s["slo_attainment"] == pytest.approx(2 / 5)
    assert (s["completed"], s["failed"]) == (4, 1)
    assert s["errors"] == {"UNAVAILABLE": {"count": 1, "example": "UNAVAILABLE: gone"}}
    assert s["request_throughput"] == pytest.approx(4 / 2.0)
    assert s["output_throughput"] == pytest.approx(44 / 2.0)
    assert s["total_token_throughput"] == pytest.approx((400 + 44) / 2.0)


def test_without_an_slo_every_completed_request_is_good():
    records = [record(0.5, 0.1, 3), RequestRecord(0.0, 10, error="x")]
    assert summarize(records, elapsed=4.0)["goodput"] == pytest.approx(1 / 4.0)


def test_latency_percentiles_interpolate_between_ranks():
    records = [record(t, 0.01, 2) for t in (0.1, 0.2, 0.3, 0.4, 0.5)]
    ttft = summarize(records, elapsed=1.0)["ttft_ms"]
    assert ttft["p50"] == pytest.approx(300.0)
    assert ttft["p90"] == pytest.approx(460.0)
    assert ttft["p99"] == pytest.approx(496.0)
    assert ttft["mean"] == pytest.approx(300.0)


def test_tpot_and_itl_spread_a_multi_token_message_over_its_tokens():
    r = RequestRecord(sent=0.0, prompt_tokens=10)
    r.tokens_arrived(1, 0.1)
    r.tokens_arrived(3, 0.4)  # three tokens in one message, 0.3 s after the first
    r.end = 0.4
    s = summarize([r], elapsed=1.0)
    assert s["tpot_ms"]["p50"] == pytest.approx(100.0)
    assert s["itl_ms"]["mean"] == pytest.approx(100.0)
    assert s["e2e_ms"]["p50"] == pytest.approx(400.0)


def test_prefix_hit_rate_and_transfer_figures():
    a, b = record(0.1, 0.01, 2, prompt=200, cached=150), record(0.1, 0.01, 2, prompt=200)
    b.transfer_s, b.transfer_bytes = 0.004, 8_000_000
    s = summarize([a, b], elapsed=1.0)
    assert s["prefix_hit_rate"] == pytest.approx(150 / 400)
    assert (s["transfers"], s["transfer_bytes"]) == (1, 8_000_000)
    assert s["transfer_bytes_per_s"] == pytest.approx(2e9)
    assert s["transfer_ms"]["p50"] == pytest.approx(4.0)
