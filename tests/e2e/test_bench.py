"""`pdserve bench` against the running cluster, through both doors: the JSON report, the
plots, the multi-turn workload."""

from __future__ import annotations

import json

import pytest

from pdserve.cluster.cli import main

pytestmark = pytest.mark.slow

SMALL = ["--num", "6", "--prompt-len", "40", "--max-tokens", "8", "--json"]


def bench(capsys, *argv: str) -> dict:
    assert main(["bench", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_sweep_on_the_grpc_door_reports_each_rate_and_plots(cluster, capsys, tmp_path):
    result = bench(
        capsys,
        *("--server", cluster.target, *SMALL),
        *("--sweep", "4,8", "--ttft-ms", "60000", "--tpot-ms", "60000", "--plot", str(tmp_path)),
    )
    assert result["target"] == "grpc"
    assert [run["rate"] for run in result["runs"]] == [4.0, 8.0]
    for run in result["runs"]:
        assert (run["completed"], run["failed"]) == (6, 0)
        assert run["goodput"] == pytest.approx(run["request_throughput"])  # generous SLOs
        assert run["output_tokens"] == 6 * 8
        assert 0 < run["ttft_ms"]["p50"] <= run["ttft_ms"]["p99"] <= run["e2e_ms"]["p99"]
        assert run["tpot_ms"]["p50"] > 0 and run["itl_ms"]["p50"] > 0
        # local_prefill_max_tokens 0: every uncached prompt crosses the KV channel
        assert run["transfers"] > 0 and run["transfer_bytes"] > 0
    for name in ("latency_cdf.png", "throughput_vs_rate.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


def test_the_openai_door_takes_the_same_workload(cluster, capsys):
    result = bench(
        capsys,
        *("--openai-url", f"http://{cluster.http_target}", *SMALL),
        *("--lengths", "uniform", "--concurrency", "2"),
    )
    run = result["runs"][0]
    assert result["target"] == "openai"
    assert (run["completed"], run["failed"]) == (6, 0)
    assert run["ttft_ms"]["p50"] > 0 and run["tpot_ms"]["p50"] > 0


def test_multi_turn_conversations_hit_the_prefix_cache(cluster, capsys):
    result = bench(
        capsys,
        *("--server", cluster.target, "--workload", "multi-turn", "--conversations", "2"),
        *("--turns", "2", "--system-len", "48", "--user-len", "8", "--max-tokens", "4", "--json"),
    )
    assert (result["completed"], result["failed"]) == (4, 0)
    assert result["follow_up_hit_rate"] > 0.5
    assert result["prefix_hit_rate"] > 0
