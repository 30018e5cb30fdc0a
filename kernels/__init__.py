"""Attention, norm, rotary and KV-cache kernels: Triton on CUDA, plain torch on CPU."""

from pdserve.kernels._triton import use_triton
from pdserve.kernels.decode_attention import decode_attention
from pdserve.kernels.dense_decode_attention import dense_decode_attention
from pdserve.kernels.fresh_prefill_attention import fresh_prefill_attention
from pdserve.kernels.kv_cache import write_kv_cache
from pdserve.kernels.linear import linear, silu_and_mul_linear
from pdserve.kernels.prefill_attention import prefill_attention
from pdserve.kernels.rms_norm import rms_norm
from pdserve.kernels.rotary import rope_cos_sin_cache, rotary_embedding

__all__ = [
    "decode_attention",
    "dense_decode_attention",
    "fresh_prefill_attention",
    "linear",
    "prefill_attention",
    "rms_norm",
    "rope_cos_sin_cache",
    "rotary_embedding",
    "silu_and_mul_linear",
    "use_triton",
    "write_kv_cache",
]
