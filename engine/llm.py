"""In-process generation: text in, text out, through one engine (no cluster)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from pdserve.api.errors import InvalidRequest
from pdserve.api.messages import TokenLogprobs
from pdserve.api.output import TextOutput
from pdserve.api.sampling import SamplingParams
from pdserve.api.tokenizer import Tokenizer
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    ttft_s: float = 0.0
    total_s: float = 0.0


class LLM:
    def __init__(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self.tokenizer = Tokenizer.from_model_dir(config.model)
        self._ids = itertools.count()

    def encode(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt", "prompt is empty")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(
        self,
        prompts: Seq[str | Seq[int]],
        params: SamplingParams | Seq[SamplingParams],
    ) -> list[Completion]:
        """Runs all prompts as one continuously batched workload; stop strings end a request
        as soon as its text contains one."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        start = time.perf_counter()
        done: dict[str, Completion] = {}
        texts: dict[str, TextOutput] = {}
        for prompt, p in zip(prompts, params, strict=True):
            rid = f"gen-{next(self._ids)}"
            ids = self.encode(prompt)
            self.engine.add_request(rid, ids, p)
            done[rid] = Completion(rid, ids)
            texts[rid] = TextOutput(self.tokenizer, ids, p.stop)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                c = done[out.request_id]
                if not c.token_ids:
                    c.ttft_s = time.perf_counter() - start
                c.token_ids += out.new_token_ids
                if out.logprobs is not None:
                    c.logprobs.append(out.logprobs)
                delta, stopped = texts[c.request_id].add(out.new_token_ids, final=out.finished)
                c.text += delta
                if stopped and not out.finished:
                    self.engine.abort(c.request_id)
                if stopped or out.finished:
                    c.finish_reason = "stop" if stopped else out.finish_reason
                    c.total_s = time.perf_counter() - start
        return list(done.values())
