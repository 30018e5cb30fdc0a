"""A CPU engine keeps the memory its steps free, so the next step does not fault it in again."""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = """
import resource, sys, torch
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine

def faults_of_64_mib_tensors(n):
    faults = []
    for _ in range(n):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 << 20)  # allocated, touched and freed
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults

plain = faults_of_64_mib_tensors(4)
LLMEngine(EngineConfig(model=sys.argv[1], dtype="float32", num_blocks=64))
print(*plain, *faults_of_64_mib_tensors(16)[-4:])
"""


def test_after_a_cpu_engine_starts_freed_blocks_are_reused_without_page_faults(tiny_llama_dir):
    # a fresh process: the setting is process-wide, and this one may have made engines already
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tiny_llama_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    faults = [int(x) for x in out.stdout.split()]
    pages = (64 << 20) // 4096
    assert min(faults[:4]) > pages // 2, "glibc's defaults map a 64 MiB block afresh each time"
    # the heap takes a few rounds to settle, then serves the block from memory it kept
    assert sum(faults[4:]) < pages // 20
