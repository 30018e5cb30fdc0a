"""GPU benchmark of the attention kernels against their hardware limits.

Prefill: TFLOP/s of the paged Triton flash-attention beside SDPA's flash backend (causal,
head dim 128, bf16). Decode: achieved bandwidth (KV bytes read / time) of flash-decoding
beside the device's peak memory bandwidth.

    python -m pdserve.kernels.bench [--json OUT] [--prefill-lengths 4096 8192 16384] [--no-decode]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from pdserve.kernels._triton import triton
from pdserve.kernels.decode_attention import decode_attention_triton
from pdserve.kernels.prefill_attention import prefill_attention_triton

HEAD_DIM = 128
NUM_HEADS = 32
NUM_KV_HEADS = 8
BLOCK_SIZE = 16
DTYPE = torch.bfloat16
PREFILL_LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]
PREFILL_TOKENS = 16384
DECODE_BATCHES = [1, 4, 16, 64, 128, 256]
DECODE_CONTEXTS = [1024, 4096, 8192, 16384, 32768]

# Peak HBM bandwidth in bytes/s, matched against torch.cuda.get_device_name() in order.
PEAK_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),
    ("H800", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
    ("A10G", 0.6e12),
    ("L4", 0.3e12),
    ("RTX 4090", 1.008e12),
]


def peak_bandwidth(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BANDWIDTH if key in name), None)


def _time_ms(fn: Callable[[], Any]) -> float:
    """Median milliseconds, timed with CUDA events by ``triton.testing.do_bench``."""
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def _paged_cache(seq_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches holding ``seq_lens`` tokens in shuffled blocks, and block tables."""
    blocks = [-(-n // BLOCK_SIZE) for n in seq_lens]
    shape = (sum(blocks), NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    v_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    order = torch.randperm(sum(blocks), device="cuda", dtype=torch.int32)
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device="cuda")
    start = 0
    for b, n in enumerate(blocks):
        tables[b, :n] = order[start : start + n]
        start += n
    return k_cache, v_cache, tables


def bench_prefill(seq_len: int) -> dict[str, Any]:
    batch = max(1, PREFILL_TOKENS // seq_len)
    k_cache, v_cache, tables = _paged_cache([seq_len] * batch)
    q = torch.randn(batch * seq_len, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    cu_seqlens = torch.arange(0, batch + 1, dtype=torch.int32, device="cuda") * seq_len
    seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
    scale = HEAD_DIM**-0.5

    def triton_fn() -> torch.Tensor:
        return prefill_attention_triton(q, k_cache, v_cache, tables, cu_seqlens, seq_lens, scale)

    # SDPA gets the same K/V, contiguous and expanded to all query heads.
    group = NUM_HEADS // NUM_KV_HEADS
    k = k_cache[tables.long()].permute(0, 2, 1, 3, 4).flatten(2, 3)[:, :, :seq_len]
    v = v_cache[tables.long()].permute(0, 2, 1, 3, 4).flatten(2, 3)[:, :, :seq_len]
    k = k.repeat_interleave(group, dim=1).contiguous()
    v = v.repeat_interleave(group, dim=1).contiguous()
    q_sdpa = q.view(batch, seq_len, NUM_HEADS, HEAD_DIM).transpose(1, 2).contiguous()

    def sdpa_fn() -> torch.Tensor:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q_sdpa, k, v, is_causal=True, scale=scale)

    expected = sdpa_fn().transpose(1, 2).reshape_as(q)
    error = (triton_fn().float() - expected.float()).abs().max().item()
    flops = 4 * batch * NUM_HEADS * seq_len * seq_len * HEAD_DIM / 2
    triton_tflops = flops / _time_ms(triton_fn) / 1e9
    sdpa_tflops = flops / _time_ms(sdpa_fn) / 1e9
    return {
        "seq_len": seq_len,
        "batch": batch,
        "triton_tflops": triton_tflops,
        "sdpa_flash_tflops": sdpa_tflops,
        "ratio": triton_tflops / sdpa_tflops,
        "max_abs_error_vs_sdpa": error,
    }


def bench_decode(batch: int, context: int, peak: float | None) -> dict[str, Any]:
    k_cache, v_cache, tables = _paged_cache([context] * batch)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    ms = _time_ms(
        lambda: decode_attention_triton(q, k_cache, v_cache, tables, seq_lens, HEAD_DIM**-0.5)
    )
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * k_cache.element_size()
    bandwidth = kv_bytes / (ms * 1e-3)
    return {
        "batch": batch,
        "context": context,
        "time_ms": ms,
        "bandwidth_gbps": bandwidth / 1e9,
        "fraction_of_peak": None if peak is None else bandwidth / peak,
    }


def _decode_fits(batch: int, context: int) -> bool:
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * torch.finfo(DTYPE).bits // 8
    return kv_bytes < 0.5 * torch.cuda.mem_get_info()[0]


def _print_table(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    columns = list(rows[0])
    print(" | ".join(f"{c:>20}" for c in columns))
    for row in rows:
        cells = (f"{v:>20.4g}" if isinstance(v, float) else f"{v!s:>20}" for v in row.values())
        print(" | ".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="OUT", help="also write the results to this file")
    parser.add_argument(
        "--prefill-lengths",
        type=int,
        nargs="*",
        default=PREFILL_LENGTHS,
        help="prefill sequence lengths to time (none: skip prefill)",
    )
    parser.add_argument("--no-decode", action="store_true", help="skip the decode table")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or triton is None:
        print("pdserve.kernels.bench needs a CUDA device and triton.", file=sys.stderr)
        return 2

    name = torch.cuda.get_device_name()
    peak = peak_bandwidth(name)
    prefill = [bench_prefill(n) for n in args.prefill_lengths]
    decode = []
    for context in [] if args.no_decode else DECODE_CONTEXTS:
        for batch in DECODE_BATCHES:
            if _decode_fits(batch, context):
                decode.append(bench_decode(batch, context, peak))
            torch.cuda.empty_cache()

    print(f"device: {name}, peak bandwidth: {peak / 1e12 if peak else 'unknown'} TB/s")
    if prefill:
        _print_table("prefill (causal, bf16, head dim 128, 32 q / 8 kv heads)", prefill)
    if decode:
        _print_table("decode (bf16, head dim 128, 32 q / 8 kv heads, block 16)", decode)
    if args.json:
        result = {
            "date": datetime.date.today().isoformat(),
            "device": name,
            "peak_bandwidth_bytes_per_s": peak,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "prefill": prefill,
            "decode": decode,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
