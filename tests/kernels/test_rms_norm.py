from __future__ import annotations

import pytest
import torch

from pdserve.kernels.rms_norm import rms_norm_ref, rms_norm_triton

pytestmark = pytest.mark.kernels


def _inputs(hidden: int, dtype: torch.dtype, device: str | torch.device = "cpu"):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, hidden, generator=gen).to(device, dtype)
    residual = torch.randn(7, hidden, generator=gen).to(device, dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device, dtype)
    return x, residual, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_reference_equals_hugging_face_llama_rms_norm(dtype):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    x, residual, weight = _inputs(96, dtype)
    hf = llama.LlamaRMSNorm(96, eps=1e-5).to(dtype)
    hf.weight.data.copy_(weight)
    with torch.no_grad():
        assert torch.equal(rms_norm_ref(x, weight, 1e-5), hf(x))
        out, new_residual = rms_norm_ref(x, weight, 1e-5, residual)
        assert torch.equal(new_residual, residual + x)
        assert torch.equal(out, hf(residual + x))


@pytest.mark.parametrize("hidden", [64, 96, 1000])
def test_triton_rms_norm_matches_reference(assert_close, dtype, device, hidden):
    x, _, weight = _inputs(hidden, dtype, device)
    out = rms_norm_triton(x, weight, 1e-6)
    assert out.dtype == dtype
    assert_close(out, rms_norm_ref(x, weight, 1e-6), dtype)


def test_triton_rms_norm_adds_residual_first(assert_close, dtype, device):
    x, residual, weight = _inputs(96, dtype, device)
    out, new_residual = rms_norm_triton(x, weight, 1e-6, residual)
    expected_out, expected_residual = rms_norm_ref(x, weight, 1e-6, residual)
    assert torch.equal(new_residual, expected_residual)
    assert_close(out, expected_out, dtype)
