"""On CPU, keeps the memory a step frees for the next step instead of handing it back to the
kernel.

glibc's malloc serves blocks above its mmap threshold (128 KiB, rising with use to 32 MiB)
from fresh mappings that it unmaps on free, and trims its heap when more than twice that is
free at the top. A CPU prefill step allocates and frees hundreds of MiB of activations, so
every step faults them all in again and the kernel zeroes each page first. Raising both
thresholds keeps freed blocks in the heap for the next step, as torch's caching allocator does
on CUDA and tcmalloc (which vLLM's CPU guide recommends preloading) does on CPU.

NOTE: measured on the 2-core EPYC VM (2026-11-30), old and new engine back to back: 77M
model, 32 x 256 -> 32 tokens, page faults per run 307k-312k -> 68k-77k and prefill step
3.21-3.25 -> 3.07-3.09 s; tiny model, 32 x 128, prefill step 146-160 -> 128-137 ms; decode
steps and peak RSS unchanged. Set from process start instead (glibc's ``MALLOC_MMAP_THRESHOLD_``
environment variable), the decode steps were 1.3-1.5x slower, so it is set once the engine's
weights and KV cache are allocated. glibc's heap takes a few rounds of a new allocation pattern
to settle before it serves it from kept memory. A worker's engine steps on a thread of its own,
which allocates from a glibc arena that grows in 64 MiB heaps: there blocks up to about that
size are kept (a 77M model's largest prefill activation is 32 MiB at 4,096 tokens), larger
ones are still mapped afresh.
"""

from __future__ import annotations

import ctypes
import functools
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 512 << 20
_TRIM_THRESHOLD = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Raises glibc's mmap and trim thresholds, once per process; False where the C library
    has no ``mallopt`` or refuses the values."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_set = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
    trim_set = mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    if not (mmap_set and trim_set):
        logger.info(
            "malloc refused its %s threshold: CPU steps will fault some activations in again",
            "mmap" if not mmap_set else "trim",
        )
    return mmap_set and trim_set
