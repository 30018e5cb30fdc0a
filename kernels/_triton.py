"""Dispatch between Triton and the torch references, and lazy ``@triton.jit``.

Triton reads ``TRITON_INTERPRET`` when a function is decorated, and the engine imports this
package long before a test may set that variable. ``lazy_jit`` therefore defers decoration
to the first launch, and ``import pdserve.kernels`` also works where triton cannot import.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

LOG2_E = math.log2(math.e)

__all__ = ["LOG2_E", "cdiv", "lazy_jit", "next_pow2", "tl", "triton", "use_triton"]


def use_triton(t: torch.Tensor) -> bool:
    """True when ``t`` lives on CUDA, or when ``PDSERVE_TRITON=1`` forces Triton on CPU."""
    return t.is_cuda or os.environ.get("PDSERVE_TRITON") == "1"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _prepare_interpreter() -> None:
    """Re-decorate triton's own helpers (``tl.max``, ``tl.sum``, ...) for the interpreter.

    NOTE: triton decorates them when it is first imported. If that happened before
    TRITON_INTERPRET=1 was set (the engine or transformers imported triton first, as in a
    full test run), the interpreter cannot call them, so their modules are imported again.
    """
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.max, InterpretedFunction):
        importlib.reload(tl.standard)
        importlib.reload(tl)


class lazy_jit:  # noqa: N801 - used as a decorator, like triton.jit
    """``triton.jit`` applied at the first launch instead of at import.

    With ``autotune`` (a function returning ``triton.Config``s) and ``key`` (argument names),
    a kernel compiled for a GPU is autotuned over those configs (those ``prune(configs,
    named_args)`` keeps), once per key and dtypes;
    under the interpreter it is not, and the launcher passes its own tiles
    (``autotunes()`` says which).
    """

    def __init__(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        autotune: Callable[[], list[Any]] | None = None,
        prune: Callable[..., list[Any]] | None = None,
        key: tuple[str, ...] = (),
    ) -> None:
        self.fn = fn
        self._autotune = autotune
        self._prune = prune
        self._key = list(key)
        self._jitted: Any = None

    def __call__(self, fn: Callable[..., Any]) -> lazy_jit:
        """``@lazy_jit(autotune=..., key=...)`` form."""
        self.fn = fn
        return self

    def autotunes(self) -> bool:
        return self._autotune is not None and not _interpreting()

    def __getitem__(self, grid: Any) -> Any:
        if self._jitted is None:
            if triton is None:
                raise RuntimeError(f"{self.fn.__name__} needs triton, which failed to import")
            if _interpreting():
                _prepare_interpreter()
            self._jitted = triton.jit(self.fn)
            if self.autotunes():
                prune = {"early_config_prune": self._prune} if self._prune else None
                self._jitted = triton.autotune(
                    configs=self._autotune(), key=self._key, prune_configs_by=prune
                )(self._jitted)
        return self._jitted[grid]
