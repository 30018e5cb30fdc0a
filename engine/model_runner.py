"""Builds one step's input tensors from the scheduled sequences and runs the model once.

In a tensor-parallel worker rank 0 builds them and hands them to the other ranks, which
`follow()` each step with their shard."""

from __future__ import annotations

from collections.abc import Callable

import torch

from pdserve.engine.attention import AttentionBatch
from pdserve.engine.model import CausalLM
from pdserve.engine.parallel import TPGroup
from pdserve.engine.scheduler import ScheduledSeq
from pdserve.engine.step_broadcast import StepInputs, recv, send_step


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, block_size: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device
        self.tp: TPGroup = model.tp

    @torch.inference_mode()
    def run(
        self, scheduled: list[ScheduledSeq], on_layer_kv: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """One forward call over the whole ragged batch (decode sequences first); returns the
        float32 logits of the sequences that sample this step, in scheduled order."""
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
        input_ids, positions, batch, sample_idx = inputs
        hidden = self.model(input_ids, positions, batch, self.kv_cache, on_layer_kv)
        return self.model.compute_logits(hidden[sample_idx])

    def prepare(
        self, scheduled: list[ScheduledSeq]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch, torch.Tensor]:
        bs = self.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_idx: list[int] = []
        num_decode = 0
        cu_q = [0]
        for item in scheduled:
            seq, start = item.seq, item.seq.num_computed
            end = start + item.num_tokens
            tokens += seq.token_ids[start:end]
            positions += range(start, end)
            blocks = seq.block_ids
            slots += [blocks[p // bs] * bs + p % bs for p in range(start, end)]
            if item.num_tokens == 1:
                num_decode += 1
            else:
                cu_q.append(cu_q[-1] + item.num_tokens)
            if item.samples:
                sample_idx.append(len(tokens) - 1)
        dev = self.device
        decode, prefill = scheduled[:num_decode], scheduled[num_decode:]
        batch = AttentionBatch(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decode=num_decode,
            decode_block_tables=self._block_table(decode),
            decode_seq_lens=self._seq_lens(decode),
            prefill_block_tables=self._block_table(prefill),
            prefill_cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=dev),
            prefill_seq_lens=self._seq_lens(prefill),
        )
        return (
            torch.tensor(tokens, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            batch,
            torch.tensor(sample_idx, dtype=torch.long, device=dev),
        )

    def _block_table(self, items: list[ScheduledSeq]) -> torch.Tensor:
        width = max((len(i.seq.block_ids) for i in items), default=0)
        rows = [i.seq.block_ids + [0] * (width - len(i.seq.block_ids)) for i in items]
        return torch.tensor(rows, dtype=torch.int32, device=self.device).view(len(items), width)

    def _seq_lens(self, items: list[ScheduledSeq]) -> torch.Tensor:
        lens = [i.seq.num_computed + i.num_tokens for i in items]
        return torch.tensor(lens, dtype=torch.int32, device=self.device)
