"""Streaming detokenization: turn generated token ids into text deltas as they arrive."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# Prompt tokens decoded with the first output tokens, so that decoders that drop a leading
# space at the start of a string (SentencePiece's Metaspace) see real left context.
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Decodes only a short window of recent tokens per step (vLLM's prefix/read offsets).

    Invariant: `ids[prefix_offset:read_offset]` decodes to text already emitted, and
    `ids[read_offset:]` to text held back because it ends in an incomplete UTF-8 sequence
    (the decoder shows U+FFFD there). Deltas never split a character, and the concatenation of
    all deltas and `flush()` equals `decode(output ids)` when the prompt ends on a character
    boundary.
    """

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated ids and return the text that is now complete."""
        deltas = []
        for token_id in token_ids:
            self._ids.append(token_id)
            prefix_text, new_text = self._window()
            if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
                deltas.append(new_text[len(prefix_text) :])
                self._prefix_offset = self._read_offset
                self._read_offset = len(self._ids)
        return "".join(deltas)

    def flush(self) -> str:
        """The held-back tail at the end of the stream, incomplete characters shown as U+FFFD."""
        prefix_text, new_text = self._window()
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def _window(self) -> tuple[str, str]:
        window = self._ids[self._prefix_offset :]
        emitted = self._read_offset - self._prefix_offset
        decode = self._tokenizer.decode
        return (
            decode(window[:emitted], skip_special_tokens=self._skip),
            decode(window, skip_special_tokens=self._skip),
        )
