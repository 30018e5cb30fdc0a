"""Rank 0 of a tensor-parallel worker hands each step's inputs to the other ranks: one
fixed-size header, then every index tensor of the step packed into one int64 tensor, both
broadcast over the worker's group. No Python object is pickled per step.

The same stream carries a prefill worker's KV transfer orders (`kv_transfer/orders.py`) between
steps, so that the other ranks see them in the order rank 0 made them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pdserve.engine.attention import AttentionBatch
from pdserve.engine.parallel import TPGroup


class StepInputs(NamedTuple):
    input_ids: torch.Tensor
    positions: torch.Tensor
    batch: AttentionBatch
    sample_idx: torch.Tensor


# kind, then for a step: tokens, decode seqs, decode table width, prefill seqs, prefill table
# width, samples; for orders: their byte length
_HEADER_LEN = 7
_STEP, _ORDERS = 1, 2


def send_step(tp: TPGroup, inputs: StepInputs) -> None:
    input_ids, positions, b, sample_idx = inputs
    nd, dw = b.decode_block_tables.shape
    np_, pw = b.prefill_block_tables.shape
    dev = input_ids.device
    header = [_STEP, input_ids.numel(), nd, dw, np_, pw, sample_idx.numel()]
    tp.broadcast(torch.tensor(header, dtype=torch.long, device=dev))
    parts = (
        input_ids,
        positions,
        b.slot_mapping,
        b.decode_block_tables,
        b.decode_seq_lens,
        b.prefill_block_tables,
        b.prefill_cu_seqlens_q,
        b.prefill_seq_lens,
        sample_idx,
    )
    tp.broadcast(torch.cat([p.reshape(-1).long() for p in parts]))


def send_orders(tp: TPGroup, data: bytes, device: torch.device) -> None:
    header = [_ORDERS, len(data)] + [0] * (_HEADER_LEN - 2)
    tp.broadcast(torch.tensor(header, dtype=torch.long, device=device))
    tp.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device))


def recv(tp: TPGroup, device: torch.device) -> StepInputs | bytes:
    """Rank 0's next step, or its next orders (as bytes)."""
    header = tp.broadcast(torch.empty(_HEADER_LEN, dtype=torch.long, device=device))
    kind, n, nd, dw, np_, pw, ns = header.tolist()
    if kind == _ORDERS:
        body = tp.broadcast(torch.empty(n, dtype=torch.uint8, device=device))
        return body.cpu().numpy().tobytes()
    sizes = [n, n, n, nd * dw, nd, np_ * pw, np_ + 1, np_, ns]
    body = tp.broadcast(torch.empty(sum(sizes), dtype=torch.long, device=device))
    ids, pos, slots, dbt, dlens, pbt, cu, plens, sample = body.split(sizes)
    i32 = torch.int32
    batch = AttentionBatch(
        slot_mapping=slots,
        num_decode=nd,
        decode_block_tables=dbt.view(nd, dw).to(i32),
        decode_seq_lens=dlens.to(i32),
        prefill_block_tables=pbt.view(np_, pw).to(i32),
        prefill_cu_seqlens_q=cu.to(i32),
        prefill_seq_lens=plens.to(i32),
    )
    return StepInputs(ids, pos, batch, sample)
