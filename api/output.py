"""A request's text as tokens arrive: incremental detokenization plus stop-string matching."""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.api.detokenizer import IncrementalDetokenizer
from pdserve.api.stop import StopStringMatcher
from pdserve.api.tokenizer import Tokenizer


class TextOutput:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        stop: Sequence[str],
        skip_special_tokens: bool = True,
    ) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
        self._stop = StopStringMatcher(stop)
        self.stopped = False

    def add(self, token_ids: Sequence[int], final: bool = False) -> tuple[str, bool]:
        """Returns (text that is safe to show now, whether a stop string matched).

        With `final`, everything held back (an unfinished character, a possible start of a
        stop string) is released."""
        if self.stopped:
            return "", True
        text, self.stopped = self._stop.feed(self._detok.add(token_ids))
        if final and not self.stopped:
            tail, self.stopped = self._stop.feed(self._detok.flush())
            text += tail
            if not self.stopped:
                text += self._stop.flush()
        return text, self.stopped
