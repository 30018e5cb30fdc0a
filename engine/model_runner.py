"""Builds one step's input tensors from the scheduled sequences and runs the model once.

Inputs are built with numpy from a few per-sequence numbers (never a Python list per token)
and reach the device in one copy: on CUDA from one pinned staging buffer, `non_blocking`. A
decode-only step on CUDA replays a captured CUDA graph (`engine/cuda_graphs.py`); on CPU,
decode attention reads the dense mirror of the running batch's KV (`engine/dense_kv.py`).

In a tensor-parallel worker rank 0 builds the inputs and hands them to the other ranks, which
`follow()` each step with their shard.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch

from pdserve.engine.attention import AttentionBatch
from pdserve.engine.cuda_graphs import DecodeGraphs
from pdserve.engine.dense_kv import DenseKV
from pdserve.engine.host_memory import keep_freed_memory
from pdserve.engine.model import CausalLM
from pdserve.engine.parallel import TPGroup
from pdserve.engine.scheduler import ScheduledSeq
from pdserve.engine.step_broadcast import StepInputs, recv, send_step
from pdserve.kernels import native, use_triton


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        kv_cache: torch.Tensor,
        block_size: int,
        max_num_seqs: int = 256,
        max_model_len: int = 2048,
        cuda_graphs: bool = True,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device
        self.tp: TPGroup = model.tp
        # The dense mirror and fresh-prompt attention serve the torch path (CPU); the Triton
        # kernels read paged blocks in place. NOTE: both, and CUDA graphs, need per-sequence
        # state that only rank 0 has (the other ranks see index tensors), so a TP > 1 worker
        # runs the plain paths on every rank.
        single = self.tp.size == 1
        self._torch_path = single and not use_triton(kv_cache)
        self.dense = (
            DenseKV(kv_cache, kv_cache.numel() * kv_cache.element_size())
            if self._torch_path
            else None
        )
        if self.device.type == "cpu":
            native.load_all()
            keep_freed_memory()  # after the weights and the KV cache: see host_memory.py
        self._staging = _PinnedStaging(self.device) if self.device.type == "cuda" else None
        self.graphs = (
            DecodeGraphs(model, kv_cache, block_size, max_num_seqs, max_model_len)
            if single and cuda_graphs and self.device.type == "cuda"
            else None
        )

    @torch.inference_mode()
    def run(
        self, scheduled: list[ScheduledSeq], on_layer_kv: Callable[[int], None] | None = None
    ) -> torch.Tensor | None:
        """One forward call over the whole ragged batch (decode sequences first); returns the
        float32 logits of the sequences that sample this step, in scheduled order (None on
        ranks other than 0)."""
        inputs = self.prepare(scheduled)
        if self.tp.size > 1:
            send_step(self.tp, inputs)
        return self._forward(inputs, on_layer_kv)

    @torch.inference_mode()
    def follow(self, on_orders: Callable[[bytes], None] | None = None) -> None:
        """On a rank other than 0: waits for rank 0's next step and runs this rank's shard,
        or for its next KV transfer orders and hands them to `on_orders`."""
        got = recv(self.tp, self.device)
        if isinstance(got, bytes):
            on_orders(got)
        else:
            self._forward(got, None)

    def _forward(
        self, inputs: StepInputs, on_layer_kv: Callable[[int], None] | None
    ) -> torch.Tensor | None:
        batch = inputs.batch
        every_token_samples = inputs.sample_idx.numel() == inputs.input_ids.numel()
        try:
            if self.graphs is not None and on_layer_kv is None and self.graphs.fits(batch):
                hidden = self.graphs.run(inputs.input_ids, inputs.positions, batch)
                if not every_token_samples:  # a 1-token chunk that does not end its prompt
                    hidden = hidden.index_select(0, inputs.sample_idx)
                return self.model.compute_logits(hidden)
            hidden = self.model(
                inputs.input_ids,
                inputs.positions,
                batch,
                self.kv_cache,
                on_layer_kv,
                keep=None if every_token_samples else inputs.sample_idx,
            )
        except BaseException:
            if self.dense is not None:
                self.dense.clear()  # rows may hold this step's half-written tokens
            raise
        return self.model.compute_logits(hidden)

    def prepare(self, scheduled: list[ScheduledSeq]) -> StepInputs:
        bs = self.block_size
        n = len(scheduled)
        seqs = [item.seq for item in scheduled]
        counts = np.fromiter((item.num_tokens for item in scheduled), np.int64, n)
        starts = np.fromiter((s.num_computed for s in seqs), np.int64, n)
        num_decode = int(np.count_nonzero(counts == 1))
        cu = np.zeros(n + 1, np.int64)
        np.cumsum(counts, out=cu[1:])
        total = int(cu[-1])
        if num_decode == n:
            tokens = np.fromiter(
                (s.token_ids[p] for s, p in zip(seqs, starts.tolist())), np.int64, n
            )
            positions = starts
            row = np.arange(n)
        else:
            tokens = np.fromiter(
                itertools.chain.from_iterable(
                    s.token_ids[p : p + c]
                    for s, p, c in zip(seqs, starts.tolist(), counts.tolist())
                ),
                np.int64,
                total,
            )
            row = np.repeat(np.arange(n), counts)
            positions = starts[row] + np.arange(total) - cu[:-1][row]
        ends = starts + counts
        num_blocks = -(-ends // bs)
        table = np.zeros((n, int(num_blocks.max())), np.int32)
        for r, s in enumerate(seqs):
            table[r, : num_blocks[r]] = s.block_ids[: num_blocks[r]]
        slots = table[row, positions // bs].astype(np.int64) * bs + positions % bs
        samples = np.fromiter((item.samples for item in scheduled), bool, n)
        sample_idx = cu[1:][samples] - 1
        nd = num_decode
        width_d = int(num_blocks[:nd].max()) if nd else 0
        width_p = int(num_blocks[nd:].max()) if nd < n else 0
        arrays = {
            "input_ids": tokens,
            "positions": positions,
            "slot_mapping": slots,
            "sample_idx": sample_idx,
            "decode_block_tables": np.ascontiguousarray(table[:nd, :width_d]),
            "decode_seq_lens": ends[:nd].astype(np.int32),
            "prefill_block_tables": np.ascontiguousarray(table[nd:, :width_p]),
            "prefill_cu_seqlens_q": (cu[nd:] - cu[nd]).astype(np.int32),
            "prefill_seq_lens": ends[nd:].astype(np.int32),
        }
        t = self._staging.upload(arrays) if self._staging else _from_numpy(arrays)
        dense = self.dense.plan(seqs[:nd]) if self.dense is not None else None
        fresh = self._torch_path and nd < n and not starts[nd:].any()
        fresh_lens = tuple(counts[nd:].tolist()) if fresh else None
        batch = AttentionBatch(
            slot_mapping=t["slot_mapping"],
            num_decode=nd,
            decode_block_tables=t["decode_block_tables"],
            decode_seq_lens=t["decode_seq_lens"],
            prefill_block_tables=t["prefill_block_tables"],
            prefill_cu_seqlens_q=t["prefill_cu_seqlens_q"],
            prefill_seq_lens=t["prefill_seq_lens"],
            dense=dense,
            fresh_prefill_lens=fresh_lens,
        )
        return StepInputs(t["input_ids"], t["positions"], batch, t["sample_idx"])


def _from_numpy(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(a) for name, a in arrays.items()}


class _PinnedStaging:
    """Stages a step's inputs in one pinned host buffer and sends them in one `non_blocking`
    copy; the int32 inputs are narrowed on the device.

    NOTE: a fresh pinned buffer per step is cheap (torch's caching host allocator hands back
    one whose earlier copy has completed), and the host never waits for the copy: it is
    ordered on the stream before the kernels that read it.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def upload(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        sizes = [a.size for a in arrays.values()]
        host = torch.empty(sum(sizes), dtype=torch.int64, pin_memory=True)
        np.concatenate([a.reshape(-1) for a in arrays.values()], out=host.numpy())
        dev = host.to(self.device, non_blocking=True)
        out = {}
        for (name, a), chunk in zip(arrays.items(), dev.split(sizes)):
            t = chunk.view(a.shape)
            out[name] = t if a.dtype == np.int64 else t.to(torch.int32)
        return out
