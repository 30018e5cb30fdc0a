"""Sampling parameters and their validation (torch-free, shared by router and workers)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pdserve.api.errors import InvalidRequest

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this decode greedily (as vLLM's), so 1/temperature never overflows."""


@dataclass(frozen=True)
class SamplingParams:
    """What to generate. Greedy unless a temperature of at least `GREEDY_TEMPERATURE` is given;
    these defaults are the same at every door (gRPC, `pdserve generate`, the Python client).

    `seed` makes sampling reproducible: the randomness of the token at absolute position p
    depends only on (seed, p), so a request resumed from its prompt plus the tokens it already
    produced continues exactly as the uninterrupted one would have.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_float("temperature", self.temperature, low=0.0)
        _check_int("top_k", self.top_k, low=0)
        _check_float("top_p", self.top_p, low=0.0, low_open=True, high=1.0)
        _check_float("min_p", self.min_p, low=0.0, high=1.0)
        _check_float("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        _check_float("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0, high=2**63 - 1)
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidRequest("stop", "must be a list of non-empty strings")
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, low=0)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequest("ignore_eos", "must be a boolean")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=20)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def truncates(self) -> bool:
        """True when top-k, top-p or min-p may cut tokens from the distribution."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SamplingParams:
        """Build from a plain mapping, naming the first unknown key as an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in values if k not in known]
        if unknown:
            raise InvalidRequest(unknown[0], "unknown sampling field")
        kwargs = dict(values)
        for name in ("stop", "stop_token_ids"):
            if name in kwargs:
                value = kwargs[name]
                if isinstance(value, str):
                    raise InvalidRequest(name, "must be a list, not a string")
                kwargs[name] = tuple(value)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["stop"] = list(self.stop)
        out["stop_token_ids"] = list(self.stop_token_ids)
        return out


def _check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(name, f"must be an integer, got {value!r}")
    if low is not None and value < low:
        raise InvalidRequest(name, f"must be >= {low}, got {value}")
    if high is not None and value > high:
        raise InvalidRequest(name, f"must be <= {high}, got {value}")


def _check_float(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequest(name, f"must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        bound = f"> {low}" if low_open else f">= {low}"
        raise InvalidRequest(name, f"must be {bound}, got {value}")
    if high is not None and value > high:
        raise InvalidRequest(name, f"must be <= {high}, got {value}")
