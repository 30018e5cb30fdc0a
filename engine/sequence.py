"""One request's state inside an engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.api.sampling import SamplingParams

if TYPE_CHECKING:
    from pdserve.engine.prefix_cache import Node


class Status(enum.Enum):
    RESERVED = "reserved"  # blocks held for KV that another worker is sending
    READY = "ready"  # that KV has landed; waiting for a place in the running batch
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """`token_ids` is the prompt followed by the output so far; the first `num_computed` of
    them have KV in `block_ids`. `seed` is always set, so sampling is reproducible on resume.

    `block_hashes` names the full blocks of `token_ids` seen so far; `cache_node` is the
    deepest prefix-cache node this sequence locks (its first `cache_depth` blocks are cached).
    `num_cached_prompt_tokens` counts the prompt tokens it reused instead of computing when it
    was first admitted (None until then; a recompute after preemption does not change it).
    `arrived` and `started` (its first step here; None for KV computed elsewhere) time its queue
    and prefill.
    """

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    block_hashes: list[int] = field(default_factory=list)
    cache_node: Node | None = None
    cache_depth: int = 0
    num_cached_prompt_tokens: int | None = None
    counted: bool = False  # in the engine's request counters
    arrived: float = field(default_factory=time.monotonic)
    started: float | None = None
    timed: bool = False  # its queue and prefill times went out with its first token

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed
