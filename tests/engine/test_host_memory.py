"""A CPU engine keeps the memory its steps free, so the next step does not fault it in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

_SCRIPT = """
import resource, sys, threading, torch
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine

def faults_of_tensors(n, mib, out):
    for _ in range(n):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(mib << 18)  # allocated, touched and freed
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out

plain = faults_of_tensors(4, 64, [])
LLMEngine(EngineConfig(model=sys.argv[1], dtype="float32", num_blocks=64))
kept = faults_of_tensors(16, 64, [])[-4:]
# a worker's engine thread: its own glibc arena, whose heaps hold blocks of up to ~64 MiB
on_thread = []
thread = threading.Thread(target=faults_of_tensors, args=(16, 32, on_thread))
thread.start()
thread.join()
print(*plain, *kept, *on_thread[-4:])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc thresholds")
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
    assert sum(faults[4:8]) < pages // 20
    assert sum(faults[8:]) < pages // 40, "a thread's arena keeps a 32 MiB block too"
