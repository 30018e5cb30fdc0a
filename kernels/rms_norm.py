"""RMSNorm with an optional fused residual add (Hugging Face ``LlamaRMSNorm`` numerics)."""

from __future__ import annotations

import ctypes
import functools

import torch

from pdserve.kernels import native
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


def rms_norm_native(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> NormOutput | None:
    """The one-pass C kernel of `csrc/rms_norm.c` for float32 on CPU; None where it does not
    apply (another dtype, device or layout, or no kernel built on this machine)."""
    tensors = (x, weight) if residual is None else (x, weight, residual)
    if (
        x.dim() != 2
        or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors)
        or any(t.stride(-1) != 1 for t in tensors)
        or weight.shape != (x.shape[1],)
        or (residual is not None and residual.shape != x.shape)
        or (kernel := _native_kernel()) is None
    ):
        return None
    rows, hidden = x.shape
    out = torch.empty(rows, hidden, dtype=torch.float32, device="cpu")
    new_residual = None if residual is None else torch.empty_like(out)
    kernel(
        x.data_ptr(),
        x.stride(0),
        None if residual is None else residual.data_ptr(),
        0 if residual is None else residual.stride(0),
        weight.data_ptr(),
        out.data_ptr(),
        None if new_residual is None else new_residual.data_ptr(),
        rows,
        hidden,
        eps,
        torch.get_num_threads(),
    )
    return out if new_residual is None else (out, new_residual)


@functools.cache
def _native_kernel() -> ctypes._CFuncPtr | None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    argtypes = [ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64, ctypes.c_float, ctypes.c_int]
    return native.function("rms_norm", "rms_norm_f32", argtypes, None)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> NormOutput:
    """RMSNorm of ``x`` ``[T, hidden]``; with ``residual``, returns ``(norm(x + r), x + r)``."""
    if use_triton(x):
        return rms_norm_triton(x, weight, eps, residual)
    out = rms_norm_native(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual) if out is None else out
