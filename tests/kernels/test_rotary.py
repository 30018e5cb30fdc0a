from __future__ import annotations

import pytest
import torch
from native_helpers import needs_cc

from pdserve.kernels.rotary import (
    rope_cos_sin_cache,
    rotary_embedding_native,
    rotary_embedding_ref,
    rotary_embedding_triton,
)

pytestmark = pytest.mark.kernels

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
SCALINGS = {
    "none": None,
    "default": {"rope_type": "default"},
    "linear": {"type": "linear", "factor": 4.0},
    "llama3": LLAMA3,
}


def _hf_rotary(head_dim: int, rope_scaling: dict | None):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=256,
        rope_theta=500000.0,
        rope_scaling=rope_scaling,
    )
    return llama, llama.LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("scaling", SCALINGS.values(), ids=SCALINGS.keys())
def test_cos_sin_cache_equals_hugging_face(scaling):
    _, hf = _hf_rotary(64, scaling)
    positions = torch.arange(256)[None, :]
    cos, sin = hf(torch.zeros(1, dtype=torch.float32), positions)
    cache = rope_cos_sin_cache(64, 256, 500000.0, scaling)
    assert torch.equal(cache[:, :32], cos[0, :, :32])
    assert torch.equal(cache[:, 32:], sin[0, :, :32])


def test_reference_rotation_equals_hugging_face_apply_rotary_pos_emb():
    llama, hf = _hf_rotary(64, LLAMA3)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(9, 8, 64, generator=gen), torch.randn(9, 2, 64, generator=gen)
    positions = torch.tensor([0, 1, 2, 63, 64, 65, 100, 200, 255])
    cos, sin = hf(q, positions[None, :])
    hf_q, hf_k = llama.apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin
    )
    cache = rope_cos_sin_cache(64, 256, 500000.0, LLAMA3)
    out_q, out_k = rotary_embedding_ref(q, k, positions, cache)
    assert torch.equal(out_q, hf_q[0].transpose(0, 1))
    assert torch.equal(out_k, hf_k[0].transpose(0, 1))


def test_unknown_rope_type_is_refused_by_name():
    with pytest.raises(ValueError, match="rope_scaling.rope_type"):
        rope_cos_sin_cache(64, 16, 10000.0, {"rope_type": "yarn", "factor": 2.0})


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_triton_rotary_matches_reference(assert_close, dtype, device, head_dim, group):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(11, 2 * group, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(11, 2, head_dim, generator=gen).to(device, dtype)
    positions = torch.randint(0, 128, (11,), generator=gen).to(device)
    cache = rope_cos_sin_cache(head_dim, 128, 10000.0, None, device=device)
    out_q, out_k = rotary_embedding_triton(q, k, positions, cache)
    ref_q, ref_k = rotary_embedding_ref(q, k, positions, cache)
    assert out_q.dtype == dtype and out_k.dtype == dtype
    assert_close(out_q, ref_q, dtype)
    assert_close(out_k, ref_k, dtype)


@needs_cc
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("tokens, heads, kv_heads", [(1, 4, 4), (7, 12, 4), (300, 8, 1)])
@pytest.mark.parametrize("scaling", ["none", "llama3"])
def test_native_rotary_equals_reference_bit_for_bit(head_dim, tokens, heads, kv_heads, scaling):
    gen = torch.Generator().manual_seed(tokens)
    # q and k as the model has them: column slices of one fused qkv projection
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    cache = rope_cos_sin_cache(head_dim, 512, 500000.0, SCALINGS[scaling])
    positions = torch.randint(0, 512, (tokens,), generator=gen)
    out_q, out_k = rotary_embedding_native(q, k, positions, cache)
    ref_q, ref_k = rotary_embedding_ref(q, k, positions, cache)
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)


@needs_cc
def test_native_rotary_refuses_positions_past_its_table_and_leaves_what_it_does_not_cover():
    cache = rope_cos_sin_cache(64, 16, 10000.0, None)
    q, k = torch.randn(2, 2, 64), torch.randn(2, 1, 64)
    with pytest.raises(IndexError, match="outside the rotary cache"):
        rotary_embedding_native(q, k, torch.tensor([3, 16]), cache)
    with pytest.raises(IndexError, match="outside the rotary cache"):
        rotary_embedding_native(q, k, torch.tensor([-1, 0]), cache)
    positions = torch.tensor([0, 1])
    assert rotary_embedding_native(q.half(), k.half(), positions, cache.half()) is None
    assert rotary_embedding_native(q, k[:1], positions, cache) is None  # fewer key tokens
    assert rotary_embedding_native(q, k[..., :32], positions, cache) is None
    assert rotary_embedding_native(q, k, torch.tensor([0, 1, 2]), cache) is None
