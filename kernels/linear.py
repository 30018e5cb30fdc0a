"""``y = x @ W^T + b``: on CPU through oneDNN with the weight prepacked once, else ``F.linear``.

NOTE: measured on the 2-core EPYC development VM (torch 2.13, 2026-11-30), a prepacked oneDNN
weight beats ``F.linear`` (MKL sgemm on a row-major weight) at every shape the engine runs:
fp32 [32 x 768] @ [768 x 4096] 116 -> 218 GFLOP/s on 2 threads (75 -> 94 on one), prefill
[4096 x 768] @ [768 x 1280] 201 -> 226, bf16 351 -> 425. The packed copy is made on first use
and kept beside the weight (the weight is still needed: tied embeddings, KV transfer, TP
loading); an in-place change of the weight (its version counter) repacks it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_PACKED_ATTR = "_pdserve_onednn_packed"


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_reorder_linear_weight"
    )


_ONEDNN = _onednn_available()


def _packed(weight: torch.Tensor) -> torch.Tensor:
    cached = getattr(weight, _PACKED_ATTR, None)
    if cached is not None and cached[0] == weight._version:
        return cached[1]
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    setattr(weight, _PACKED_ATTR, (weight._version, packed))
    return packed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a 2-D ``x``; the oneDNN path on CPU for float32 and
    bfloat16 (results equal ``F.linear`` up to summation order)."""
    if (
        not _ONEDNN
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.bfloat16)
        or weight.dtype != x.dtype
        or x.dim() != 2
    ):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, _packed(weight), bias, "none", [], "")
