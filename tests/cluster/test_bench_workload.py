"""What `pdserve bench` sends: length distributions, arrivals, trace files."""

from __future__ import annotations

import json
import random
import statistics

import pytest

from pdserve.cluster.bench_workload import Lengths, poisson_arrivals, random_requests, read_trace


def test_lengths_follow_their_distribution():
    rng = random.Random(0)
    assert {Lengths(50).sample(rng) for _ in range(100)} == {50}
    uniform = [Lengths(100, "uniform", 0.5).sample(rng) for _ in range(2000)]
    assert min(uniform) >= 50 and max(uniform) <= 150
    assert statistics.mean(uniform) == pytest.approx(100, rel=0.05)
    lognormal = [Lengths(100, "lognormal", 0.8).sample(rng) for _ in range(4000)]
    assert statistics.median(lognormal) == pytest.approx(100, rel=0.1)
    assert max(lognormal) > 300  # a long tail


def test_poisson_arrivals_average_the_rate():
    arrivals = poisson_arrivals(4000, 20.0, random.Random(1))
    assert arrivals == sorted(arrivals)
    assert len(arrivals) / arrivals[-1] == pytest.approx(20.0, rel=0.05)
    assert poisson_arrivals(3, float("inf"), random.Random(1)) == [0.0, 0.0, 0.0]


def test_random_requests_fit_the_context():
    rng = random.Random(2)
    lengths = Lengths(60, "lognormal", 1.5)
    requests = random_requests([0.0] * 200, lengths, lengths, 1000, rng, max_model_len=128)
    assert all(len(r.prompt) + r.max_tokens < 128 and r.max_tokens >= 1 for r in requests)
    assert all(0 <= t < 1000 for r in requests for t in r.prompt)


def test_a_trace_gives_arrivals_and_lengths(tmp_path):
    trace = tmp_path / "trace.jsonl"
    lines = [
        {"timestamp": 1500, "input_length": 20, "output_length": 4},
        {"timestamp": 0, "input_length": 8, "output_length": 2},
    ]
    trace.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    requests = read_trace(trace, 1000, random.Random(0), max_model_len=64)
    assert [(r.arrival_s, len(r.prompt), r.max_tokens) for r in requests] == [
        (0.0, 8, 2),
        (1.5, 20, 4),
    ]


def test_a_bad_trace_line_is_refused_by_number(tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 8, "output_length": 2}\n{"timestamp": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_trace(trace, 1000, random.Random(0), max_model_len=64)
