"""Compile every kernel to an sm_90 (H100) cubin with Triton's NVIDIA backend; no GPU needed.

Run by ``test_compile_for_h100.py`` in a fresh process: compiling needs triton imported
without TRITON_INTERPRET. Prints one JSON object per kernel configuration.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

PTR_TYPES = {
    "block_tables_ptr": "*i32",
    "cu_seqlens_ptr": "*i32",
    "seq_lens_ptr": "*i32",
    "slot_ptr": "*i64",
    "positions_ptr": "*i64",
    "cache_ptr": "*fp32",
    "part_out_ptr": "*fp32",
    "part_lse_ptr": "*fp32",
}
FLOAT_ARGS = {"qk_scale", "eps"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")


def _module(name: str):
    return importlib.import_module(f"pdserve.kernels.{name}")


def _spilled_bytes(cubin: bytes) -> int:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run(
            [CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    return sum(int(w.split(":")[1]) for w in usage.split() if w.startswith("STACK:"))


def compile_kernel(name: str, kernel, dtype: str, config: dict) -> dict:
    """Compile as the JIT would for 16-byte aligned pointers and strides."""
    fn = triton.jit(kernel.fn)
    options = {k: config[k] for k in ("num_warps", "num_stages") if k in config}
    constexprs = {k: v for k, v in config.items() if k not in options}
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = PTR_TYPES.get(arg, f"*{dtype}")
        else:
            signature[arg] = "fp32" if arg in FLOAT_ARGS else "i32"
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, arg in enumerate(fn.arg_names)
        if arg.endswith("_ptr") or arg.startswith("stride")
    }
    result = {"kernel": name, "dtype": dtype, "config": config}
    try:
        source = ASTSource(fn, signature, constexprs, attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        result["spilled_bytes"] = _spilled_bytes(compiled.asm["cubin"])
        result["shared_bytes"] = compiled.metadata.shared
    except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
        result["error"] = f"{type(e).__name__}: {e}"
    return result


def cases():
    prefill = _module("prefill_attention")
    for dtype in ("bf16", "fp16"):
        for head_dim in (64, 128):
            for m, n, warps, stages in prefill.gpu_tiles(head_dim):
                config = {"BLOCK_M": m, "BLOCK_N": n, "num_warps": warps, "num_stages": stages}
                config |= {"BLOCK_D": head_dim, "KV_BLOCK_SIZE": 16, "DOT_PRECISION": "tf32"}
                yield "prefill", prefill._prefill_attention_kernel, dtype, config
    decode = _module("decode_attention")
    for group in (1, 8, 32):
        config = decode.launch_config(on_gpu=True)
        config |= {"BLOCK_G": max(16, group), "BLOCK_D": 128, "KV_BLOCK_SIZE": 16}
        config |= {"DOT_PRECISION": "tf32"}
        yield "decode", decode._decode_attention_kernel, "bf16", config
        reduce_config = {"BLOCK_S": group, "BLOCK_D": 128, "BLOCK_N": config["BLOCK_N"]}
        yield "decode_reduce", decode._decode_reduce_kernel, "bf16", reduce_config
    norm = _module("rms_norm")._rms_norm_kernel
    yield "rms_norm", norm, "bf16", {"HAS_RESIDUAL": True, "BLOCK": 8192, "num_warps": 8}
    yield "rms_norm", norm, "bf16", {"HAS_RESIDUAL": False, "BLOCK": 4096, "num_warps": 8}
    rotary = _module("rotary")._rotary_kernel
    yield "rotary", rotary, "bf16", {"BLOCK_H": 64, "BLOCK_KVH": 8, "BLOCK_HALF": 64}
    write = _module("kv_cache")._write_kv_cache_kernel
    yield "write_kv_cache", write, "bf16", {"BLOCK_H": 8, "BLOCK_D": 128}


if __name__ == "__main__":
    for case in cases():
        print(json.dumps(compile_kernel(*case)))
