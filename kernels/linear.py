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
# NOTE: SiLU and the product in the GEMMs' epilogues beat two plain GEMMs and two passes only
# once the projection outgrows the caches: 0.87x time at 1,024 rows of a 768 -> 2x2048 MLP, 0.95x
# on 256 -> 2x688, but 1.03-1.1x at 32 rows (the same VM).
_FUSED_SILU_MIN_ROWS = 512


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_reorder_linear_weight"
    )


_ONEDNN = _onednn_available()


def _packed(weight: torch.Tensor, chunks: int = 1) -> tuple[torch.Tensor, ...]:
    """The weight prepacked for oneDNN, as `chunks` equal blocks of its rows."""
    attr = f"{_PACKED_ATTR}_{chunks}"
    cached = getattr(weight, attr, None)
    if cached is not None and cached[0] == weight._version:
        return cached[1]
    packed = tuple(
        torch.ops.mkldnn._reorder_linear_weight(w.contiguous())
        for w in weight.detach().chunk(chunks)
    )
    setattr(weight, attr, (weight._version, packed))
    return packed


def _onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        _ONEDNN
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == x.dtype
        and x.dim() == 2
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a 2-D ``x``; the oneDNN path on CPU for float32 and
    bfloat16 (results equal ``F.linear`` up to summation order)."""
    if not _onednn(x, weight):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, _packed(weight)[0], bias, "none", [], "")


def silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``silu(x @ Wg^T) * (x @ Wu^T)`` for ``weight = [Wg; Wu]`` (the gate rows, then as many
    up rows).

    On CPU the weight is packed once, as its two halves: from `_FUSED_SILU_MIN_ROWS` rows the
    SiLU and the product run in the epilogues of the two oneDNN GEMMs, so neither the
    ``[T, 2I]`` projection nor the passes over it are made (results equal the unfused form up
    to oneDNN's SiLU, within 1e-6 relative); below, the two GEMMs are plain.
    """
    if not _onednn(x, weight):
        gate, up = F.linear(x, weight).chunk(2, dim=-1)
        return F.silu(gate) * up
    gate_w, up_w = _packed(weight, chunks=2)
    project = torch.ops.mkldnn._linear_pointwise
    if x.shape[0] < _FUSED_SILU_MIN_ROWS:
        gate = project(x, gate_w, None, "none", [], "")
        return F.silu(gate, inplace=True).mul_(project(x, up_w, None, "none", [], ""))
    gate = project(x, gate_w, None, "swish", [], "")
    return project(x, gate, up_w, None, "mul")
