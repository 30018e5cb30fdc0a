from __future__ import annotations

import pytest
import torch
from native_helpers import needs_cc

from pdserve.kernels.rms_norm import rms_norm, rms_norm_native, rms_norm_ref, rms_norm_triton

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


@needs_cc
@pytest.mark.parametrize("rows, hidden", [(1, 64), (7, 96), (300, 1000)])
def test_native_rms_norm_matches_reference_and_is_what_the_cpu_engine_runs(rows, hidden):
    gen = torch.Generator().manual_seed(rows)
    wide = torch.randn(rows, hidden + 8, generator=gen)
    x = wide[:, :hidden]  # rows further apart than their length, as a slice of a wider output
    residual = torch.randn(rows, hidden, generator=gen)
    weight = 1 + 0.1 * torch.randn(hidden, generator=gen)
    out = rms_norm_native(x, weight, 1e-5)
    torch.testing.assert_close(out, rms_norm_ref(x, weight, 1e-5), atol=1e-5, rtol=1e-5)
    out, new_residual = rms_norm_native(x, weight, 1e-5, residual)
    expected_out, expected_residual = rms_norm_ref(x, weight, 1e-5, residual)
    assert torch.equal(new_residual, expected_residual)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    assert torch.equal(rms_norm(x, weight, 1e-5, residual)[0], out)


def test_native_rms_norm_leaves_other_dtypes_to_the_reference():
    x, residual, weight = _inputs(96, torch.bfloat16)
    assert rms_norm_native(x, weight, 1e-5, residual) is None
    assert torch.equal(rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5))
