"""The engine: add requests, call `step()` until they finish.

A step is three calls, as in nano-vllm: schedule, run the model once over the ragged batch,
sample and update the sequences.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from functools import partial

import torch

from pdserve.api.block_hash import model_salt
from pdserve.api.errors import InvalidRequest, NotFound
from pdserve.api.kv_events import BlockStored, KVEvent
from pdserve.api.messages import RankStatus, TokenLogprobs, WorkerStatus
from pdserve.api.sampling import SamplingParams
from pdserve.engine.config import EngineConfig, ModelConfig
from pdserve.engine.kv_pool import (
    BlockPool,
    allocate_kv_cache,
    blocks_for_memory,
    device_memory_bytes,
)
from pdserve.engine.model import CausalLM
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.parallel import SINGLE, TPGroup
from pdserve.engine.sampler import sample
from pdserve.engine.scheduler import ScheduledSeq, Scheduler
from pdserve.engine.sequence import Sequence
from pdserve.engine.weights import iter_weights

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: tuple[int, ...]
    finished: bool
    finish_reason: str | None = None
    logprobs: TokenLogprobs | None = None
    cached_prompt_tokens: int = 0  # of the prompt, reused from this engine's prefix cache
    # Set with the first token of a prompt this engine computed: seconds it waited for its
    # first step, and from then to its first token.
    queue_s: float = 0.0
    prefill_s: float = 0.0


@dataclass(frozen=True)
class EngineStats:
    """Counters and gauges a worker reports; cumulative ones count since the engine started."""

    running: int
    waiting: int
    reserved: int
    free_blocks: int
    total_blocks: int
    cached_blocks: int
    requests_total: int
    prompt_tokens_computed: int
    prompt_tokens_cached: int
    preemptions: int

    def worker_status(
        self, worker_id: str, role: str, ranks: tuple[RankStatus, ...], **transfer: int
    ) -> WorkerStatus:
        """What a worker reports of itself: these numbers (rank 0's), its KV transfer counters,
        and each of its tensor-parallel ranks."""
        return WorkerStatus(
            worker_id=worker_id,
            role=role,
            tp=len(ranks),
            ranks=ranks,
            running=self.running,
            waiting=self.waiting + self.reserved,
            free_blocks=self.free_blocks,
            total_blocks=self.total_blocks,
            cached_blocks=self.cached_blocks,
            requests_total=self.requests_total,
            prompt_tokens_computed=self.prompt_tokens_computed,
            prompt_tokens_cached=self.prompt_tokens_cached,
            **transfer,
        )


def resolve_dtype(name: str, model_config: ModelConfig) -> torch.dtype:
    if name == "auto":
        name = model_config.dtype if model_config.dtype in _TORCH_DTYPES else "float32"
    return _TORCH_DTYPES[name]


class LLMEngine:
    """Requests go in by id; `step()` advances them all. Another worker's KV comes in through
    `reserve` (blocks held for it), `block_ids` (where to write it) and `admit_prefilled`.

    In a tensor-parallel worker every rank builds an engine over its shard; rank 0 steps it,
    and the other ranks only `runner.follow()` rank 0's steps.

    NOTE: requests are validated once, at the edge (the router, or `LLM`); the engine checks
    only cheap invariants (ids in range with min/max, the length), never per token in Python.
    """

    def __init__(self, config: EngineConfig, tp: TPGroup = SINGLE) -> None:
        self.config = config
        self.model_config = mc = ModelConfig.from_model_dir(config.model)
        self.dtype = resolve_dtype(config.dtype, mc)
        self.device = torch.device(config.device)
        self.tp = tp
        self.model = CausalLM(mc, self.dtype, self.device, tp)
        self.model.load_weights(iter_weights(mc.path))
        kv_heads = self.model.num_kv_heads
        num_blocks = config.num_blocks or blocks_for_memory(
            config.kv_memory_fraction * device_memory_bytes(self.device),
            mc.num_layers,
            kv_heads,
            config.block_size,
            mc.head_dim,
            self.dtype,
        )
        self.kv_cache = allocate_kv_cache(
            mc.num_layers,
            num_blocks,
            kv_heads,
            config.block_size,
            mc.head_dim,
            self.dtype,
            self.device,
        )
        self._pool = BlockPool(num_blocks)
        # NOTE: a lone sequence must always fit the pool, or preemption could never free room.
        self.max_model_len = min(
            config.max_model_len or mc.max_position_embeddings,
            mc.max_position_embeddings,
            num_blocks * config.block_size,
        )
        self._scheduler = Scheduler(
            self._pool,
            config.block_size,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            model_salt(config.model, config.dtype, config.block_size),
            config.enable_prefix_cache,
        )
        self.runner = ModelRunner(
            self.model,
            self.kv_cache,
            config.block_size,
            config.max_num_seqs,
            self.max_model_len,
            config.cuda_graphs,
        )
        self.eos_token_ids = frozenset(mc.eos_token_ids)
        self._seqs: dict[str, Sequence] = {}
        self._requests_total = 0
        self._prompt_tokens_computed = 0
        self._prompt_tokens_cached = 0
        logger.info(
            "engine ready: %s, %s, %d KV blocks of %d tokens",
            mc.architecture,
            self.dtype,
            num_blocks,
            config.block_size,
        )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        params: SamplingParams,
        output_token_ids: Seq[int] = (),
        arrived: float | None = None,
    ) -> None:
        """Queues a request. `output_token_ids` resumes one that already produced tokens: they
        count towards `max_tokens` and penalties as output, and decoding continues after them.
        `arrived` (`time.monotonic()`, default now) is when the worker got it: its queue time
        starts there."""
        seq = self._new_sequence(request_id, prompt_token_ids, params, output_token_ids)
        if arrived is not None:
            seq.arrived = arrived
        self._scheduler.add(seq)

    def reserve(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        params: SamplingParams,
        output_token_ids: Seq[int] = (),
    ) -> int:
        """Holds KV blocks for a request whose KV another worker computes; returns how many
        leading tokens this engine has cached already (that KV need not come). Raises
        `CapacityExceeded` when the blocks are not there."""
        seq = self._new_sequence(request_id, prompt_token_ids, params, output_token_ids)
        try:
            return self._scheduler.reserve(seq)
        except Exception:
            del self._seqs[request_id]
            raise

    def block_ids(self, request_id: str) -> list[int]:
        """The blocks a request's KV lives in, in token order."""
        return list(self._seq(request_id).block_ids)

    def admit_prefilled(
        self, request_id: str, first_token: int, first_logprobs: TokenLogprobs | None
    ) -> StepOutput:
        """The reserved request's KV has landed, with the token the other worker sampled after
        it: the request queues for the running batch."""
        seq = self._seq(request_id)
        seq.timed = True  # its prompt was timed where it was computed
        self._count_admitted(seq)
        self._scheduler.admit_reserved(seq, seq.num_tokens)
        return self._append(seq, first_token, first_logprobs)

    def fall_back(self, request_id: str) -> None:
        """The reserved request's KV will not come: it is computed here instead."""
        self._scheduler.fall_back(self._seq(request_id))

    def abort(self, request_id: str) -> bool:
        """Stops a request at whatever stage it is and frees its blocks. False if unknown."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self._scheduler.finish(seq)
        return True

    def has_request(self, request_id: str) -> bool:
        return request_id in self._seqs

    def abort_all(self) -> list[str]:
        """Aborts every request (after a failed step); returns their ids."""
        ids = list(self._seqs)
        for rid in ids:
            self.abort(rid)
        return ids

    @property
    def weight_bytes(self) -> int:
        """This rank's share of the model's weights."""
        return self.model.weight_bytes

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    def has_unfinished(self) -> bool:
        return self._scheduler.has_work()

    def step(
        self, on_layer_kv: Callable[[list[ScheduledSeq], int], None] | None = None
    ) -> list[StepOutput]:
        """Runs one step. `on_layer_kv(scheduled, i)` is called as soon as layer i's KV of this
        step's tokens is in the cache (a prefill worker ships it from there)."""
        scheduled = self._scheduler.schedule()
        if not scheduled:
            return []
        now = time.monotonic()
        for item in scheduled:
            if item.seq.started is None:
                item.seq.started = now
        hook = partial(on_layer_kv, scheduled) if on_layer_kv is not None else None
        logits = self.runner.run(scheduled, hook)
        samplers = [s.seq for s in scheduled if s.samples]
        tokens, logprobs = sample(logits, samplers) if samplers else ([], [])
        for item in scheduled:
            seq = item.seq
            self._count_admitted(seq)
            start = seq.num_computed
            self._prompt_tokens_computed += max(
                0, min(start + item.num_tokens, seq.num_prompt_tokens) - start
            )
            seq.num_computed += item.num_tokens
            self._scheduler.cache_computed(seq)
        return [self._append(seq, t, lp) for seq, t, lp in zip(samplers, tokens, logprobs)]

    def stats(self) -> EngineStats:
        s = self._scheduler
        return EngineStats(
            running=len(s.running),
            waiting=len(s.waiting) + len(s.ready),
            reserved=s.num_reserved,
            free_blocks=s.num_available_blocks,
            total_blocks=self._pool.num_blocks,
            cached_blocks=s.num_cached_blocks,
            requests_total=self._requests_total,
            prompt_tokens_computed=self._prompt_tokens_computed,
            prompt_tokens_cached=self._prompt_tokens_cached,
            preemptions=s.num_preemptions,
        )

    def drain_kv_events(self) -> list[KVEvent]:
        """The prefix cache's stored/removed events since the last call, in order."""
        return self._scheduler.drain_kv_events()

    def cached_blocks(self) -> list[BlockStored]:
        """Every block in the prefix cache, parents first (a snapshot for the router)."""
        return self._scheduler.cached_blocks()

    def _seq(self, request_id: str) -> Sequence:
        seq = self._seqs.get(request_id)
        if seq is None:
            raise NotFound(f"request {request_id!r} is not in this engine")
        return seq

    def _count_admitted(self, seq: Sequence) -> None:
        """Counts a request once, when its prompt's KV is first complete or first scheduled."""
        if not seq.counted:
            seq.counted = True
            self._requests_total += 1
            self._prompt_tokens_cached += seq.num_cached_prompt_tokens or 0

    def _new_sequence(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        params: SamplingParams,
        output_token_ids: Seq[int],
    ) -> Sequence:
        if request_id in self._seqs:
            raise InvalidRequest("request_id", f"{request_id!r} is already running")
        tokens = [*prompt_token_ids, *output_token_ids]
        vocab = self.model_config.vocab_size
        if not prompt_token_ids:
            raise InvalidRequest("prompt_token_ids", "prompt is empty")
        if min(tokens) < 0 or max(tokens) >= vocab:
            i = next(i for i, t in enumerate(tokens) if not 0 <= t < vocab)
            field = f"prompt_token_ids[{i}]" if i < len(prompt_token_ids) else "output_token_ids"
            raise InvalidRequest(field, f"token id {tokens[i]} is outside [0, {vocab})")
        if len(tokens) >= self.max_model_len:
            raise InvalidRequest(
                "prompt", f"{len(tokens)} tokens do not fit the context of {self.max_model_len}"
            )
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        seq = Sequence(request_id, tokens, len(prompt_token_ids), params, seed)
        self._seqs[request_id] = seq
        return seq

    def _append(self, seq: Sequence, token: int, lp: TokenLogprobs | None) -> StepOutput:
        seq.token_ids.append(token)
        reason = self._finish_reason(seq, token)
        if reason is not None:
            self._scheduler.finish(seq)
            del self._seqs[seq.request_id]
        queue_s = prefill_s = 0.0
        if seq.started is not None and not seq.timed:
            seq.timed = True
            queue_s, prefill_s = seq.started - seq.arrived, time.monotonic() - seq.started
        return StepOutput(
            seq.request_id,
            (token,),
            reason is not None,
            reason,
            lp,
            seq.num_cached_prompt_tokens or 0,
            queue_s,
            prefill_s,
        )

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if seq.num_output >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None
