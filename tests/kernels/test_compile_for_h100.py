from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.kernels,
    pytest.mark.skipif(torch.cuda.is_available(), reason="the other kernel tests compile on CUDA"),
]


def test_every_kernel_compiles_for_h100_without_register_spills():
    """Catches what the interpreter forgives: dot shapes, layouts, constexpr misuse, spills."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("compile_for_h100.py"))],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert {r["kernel"] for r in results} == {
        "prefill",
        "decode",
        "decode_reduce",
        "rms_norm",
        "rotary",
        "write_kv_cache",
    }
    failures = [r for r in results if r.get("error") or r["spilled_bytes"]]
    assert not failures, json.dumps(failures, indent=1)
