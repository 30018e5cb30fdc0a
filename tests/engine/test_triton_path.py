"""The engine on the Triton kernels (interpreted on CPU) produces what the reference path does."""

from __future__ import annotations

import importlib

import pytest
from engine_helpers import generate, make_engine

from pdserve.api.sampling import SamplingParams

KERNELS = [
    getattr(importlib.import_module(f"pdserve.kernels.{module}"), name)
    for module, name in [
        ("decode_attention", "_decode_attention_kernel"),
        ("kv_cache", "_write_kv_cache_kernel"),
        ("prefill_attention", "_prefill_attention_kernel"),
        ("rms_norm", "_rms_norm_kernel"),
        ("rotary", "_rotary_kernel"),
    ]
]

PROMPTS = [
    [17, 230, 45, 999, 3, 81, 402, 77, 5, 12, 600, 41, 8, 9, 10, 11, 300, 2],
    [64, 128, 256, 512],
]


@pytest.mark.kernels
def test_engine_on_triton_kernels_matches_the_reference_path(tiny_llama_dir, monkeypatch):
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    reference = generate(make_engine(tiny_llama_dir), PROMPTS, params)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("PDSERVE_TRITON", "1")
    assert generate(make_engine(tiny_llama_dir), PROMPTS, params) == reference
    launched = [k.fn.__name__ for k in KERNELS if k._jitted is not None]
    assert launched == [k.fn.__name__ for k in KERNELS], "a kernel never ran"
