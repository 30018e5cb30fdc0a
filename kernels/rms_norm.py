"""RMSNorm with an optional fused residual add (Hugging Face ``LlamaRMSNorm`` numerics)."""

from __future__ import annotations

import torch

from pdserve.kernels._triton import lazy_jit, next_pow2, tl, use_triton

NormOutput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> NormOutput:
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = normed.to(x.dtype)  # a fresh tensor either way: scaled in place when types agree
    out = out.mul_(weight) if out.dtype == weight.dtype else weight * out
    return out if residual is None else (out, x)


@lazy_jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    new_residual_ptr,
    stride_x,
    stride_r,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        # NOTE: round the sum to the activation dtype first, as the unfused model does.
        x = (x + r).to(new_residual_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + row * hidden + cols, x, mask=mask)
        x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * hidden + cols, w * normed, mask=mask)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> NormOutput:
    num_rows, hidden = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    new_residual = None
    if residual is not None:
        residual = residual if residual.stride(-1) == 1 else residual.contiguous()
        new_residual = torch.empty_like(x, memory_format=torch.contiguous_format)
    if num_rows > 0:
        _rms_norm_kernel[(num_rows,)](
            x,
            x if residual is None else residual,
            weight,
            out,
            out if new_residual is None else new_residual,
            x.stride(0),
            0 if residual is None else residual.stride(0),
            hidden,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=next_pow2(hidden),
            num_warps=8 if hidden >= 4096 else 4,
        )
    return out if new_residual is None else (out, new_residual)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> NormOutput:
    """RMSNorm of ``x`` ``[T, hidden]``; with ``residual``, returns ``(norm(x + r), x + r)``."""
    if use_triton(x):
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)
