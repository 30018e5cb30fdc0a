"""`pdserve bench-engine` on a random model of a named shape."""

from __future__ import annotations

import json

from pdserve.cluster.cli import main


def test_bench_engine_on_a_named_shape_reports_throughput_and_bandwidth(capsys):
    argv = ["bench-engine", "--shape", "tiny", "--batch", "2", "--prompt-len", "16"]
    assert main([*argv, "--max-tokens", "4", "--threads", "1", "--compare-hf", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == "tiny" and result["device"] == "cpu"
    assert result["output_tokens_per_s"] > 0 and result["decode_step_ms"] > 0
    # tiny: 4 layers of (512 + 256 + 2 * 688 + 688) x 256 fp32 weights, 1000 x 256 embeddings
    # and LM head, 2 x 4 KV heads x 64 per token over 2 x 18 tokens.
    weights = 4 * 2832 * 256 * 4 + 4 * 256 * 4 * 2 + 256 * 4 + 2 * 1000 * 256 * 4
    assert result["bytes_per_step"] == weights + 2 * 18 * (2 * 4 * 2 * 64 * 4)
    assert result["peak_gb_s"] is None and "gpu_busy_ms" not in result
    assert result["hf"]["compiled"] is False and result["speedup_vs_hf"] > 0
