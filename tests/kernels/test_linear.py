"""The CPU linear layers: oneDNN with prepacked weights, and the fused SiLU-and-mul MLP input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdserve.kernels.linear import (
    _FUSED_SILU_MIN_ROWS,
    _ONEDNN,
    _PACKED_ATTR,
    linear,
    silu_and_mul_linear,
)

TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-4}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 32, _FUSED_SILU_MIN_ROWS, 2 * _FUSED_SILU_MIN_ROWS + 3])
def test_silu_and_mul_equals_the_unfused_mlp_input(rows, dtype):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=gen).to(dtype)
    weight = (torch.randn(2 * 160, 96, generator=gen) * 0.1).to(dtype)
    gate, up = F.linear(x.float(), weight.float()).chunk(2, dim=-1)
    out = silu_and_mul_linear(x, weight)
    assert out.shape == (rows, 160) and out.dtype == dtype
    torch.testing.assert_close(out.float(), F.silu(gate) * up, **TOL[dtype])


def test_a_weight_changed_in_place_is_packed_again():
    x, weight = torch.randn(4, 8), torch.randn(6, 8) * 0.1
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight))
    doubled = 2 * torch.randn(2 * _FUSED_SILU_MIN_ROWS, 8)
    silu_and_mul_linear(doubled, weight)
    weight.mul_(-3)
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight))
    gate, up = F.linear(doubled, weight).chunk(2, dim=-1)
    torch.testing.assert_close(silu_and_mul_linear(doubled, weight), F.silu(gate) * up)


@pytest.mark.skipif(not _ONEDNN, reason="oneDNN packing")
def test_a_gate_up_weight_is_packed_once_for_decode_and_prefill_rows():
    weight = torch.randn(2 * 160, 96) * 0.1
    silu_and_mul_linear(torch.randn(4, 96), weight)
    silu_and_mul_linear(torch.randn(2 * _FUSED_SILU_MIN_ROWS, 96), weight)
    packs = [name for name in vars(weight) if name.startswith(_PACKED_ATTR)]
    assert packs == [f"{_PACKED_ATTR}_2"], "one packed copy (as two halves), not two copies"
